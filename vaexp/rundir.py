"""THE run directory: its files, which config keys mean what, and the directory as a transaction.

A run directory (outputs/train/<time>_<dataset>_<model>_<objective>_m<M>_k<K>_<estimator>/, or a
sweep job's <sweep>/<overrides>/) holds config.yaml (the settings), checkpoint.pt (model,
optimizer, position, RNG states), metrics.json (the training state, the train summary, every
evaluation with the settings and checkpoint it used), test_log_px.<i>.pt (per-image values of
evaluation i; test_log_px.pt the latest), error.txt (a failed sweep job), TensorBoard events and
.vaexp.lock. Invariants: a process writes into a run directory only while it holds the exclusive
lock on .vaexp.lock (:func:`begin`); every write goes to a temp file that is renamed over the
old one, so a crash leaves the old file or the new one (stale temp files are removed by the next
holder); a damaged metrics.json is moved aside, never dropped; a command that fails before its
run holds a checkpoint or metrics.json removes what it created and nothing else. The key classes
below are the only lists of "which settings change what a run computes". No torch at import.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from vaexp.errors import VaexpError, one_line
from vaexp.schedule import epoch_learning_rates

CONFIG = "config.yaml"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
PER_EXAMPLE = "test_log_px.pt"
ERROR_FILE = "error.txt"
LOCK = ".vaexp.lock"
HYDRA_DIR = ".hydra"
_TEMP = re.compile(r"^\..+\.tmp-(\d+)$")          # what _atomic writes before its rename
_PER_EVAL = re.compile(r"^test_log_px\.(\d+)\.pt$")

# The importance-weight diagnostics of an evaluation (metrics.json keys, TensorBoard eval/<key>;
# vaexp.evaluate computes them, with ess_below_10 the fraction of images whose ESS is below 10).
WEIGHT_KEYS = ("ess_mean", "ess_median", "ess_below_10", "max_weight_mean", "max_weight_median")

# -- key classes (dotted config keys; a key also covers everything below it) ---------------------
# Settings that change how a run executes, never what it computes: left out of sweep job names
# (train.yaml's exclude_keys, plus the `experiment` preset choice) and of report groupings.
RUNTIME_ONLY = ("device", "progress", "log_every", "out_root", "resume", "sweep", "fast", "stack")
# Settings a resume may change: the runtime ones, the length of training, the evaluation and
# the gradient diagnostics (they only measure; the training is the same with or without them).
RESUMABLE = RUNTIME_ONLY + ("schedule.epochs", "eval", "diagnostics")
# Settings each run of a stack may have for itself (the rest, and M·K, must agree: one loop, one
# batch of data indices, one optimizer configuration).
STACK_PER_RUN = ("seed", "objective", "estimator", "beta", "m", "k", "mk", "eval",
                 "progress", "out_root", "sweep", "stack", "resume")
# Settings that the report does not group runs by: the runtime ones, the seed (aggregated over),
# mk (k and m carry it), where the data were read from, evaluation knobs that change the
# Monte Carlo draws but not what is estimated, and the gradient diagnostics.
NOT_A_SETTING = RUNTIME_ONLY + ("seed", "mk", "dataset.path", "dataset.data_dir", "dataset.download",
                                "eval.chunk", "eval.every", "diagnostics")


def quantity_key(quantity: str) -> str:
    """The key of what a run trains on, in metrics.json's train section and TensorBoard tags:
    "bound" -> train.bound, epoch/train_bound; "JVI estimate" (jvi: not a bound) -> jvi_estimate."""
    return quantity.lower().replace(" ", "_")


def final_train(train: Dict[str, Any]) -> str:
    """'final train bound -93.512' (or 'final train JVI estimate ...') from metrics.json's train."""
    q = train.get("quantity", "bound")
    return f"final train {q} {train[quantity_key(q)]:.3f}"


def covers(keys: Iterable[str], key: str) -> bool:
    """Whether dotted `key` is one of `keys` or lies below one of them."""
    return any(key == k or key.startswith(k + ".") for k in keys)


def override_keys(overrides: Iterable[str]) -> List[str]:
    """Keys of Hydra override strings: 'k=5' -> 'k', '+experiment=x' -> 'experiment'."""
    return [str(o).split("=", 1)[0].lstrip("+~") for o in overrides]


def as_dict(cfg) -> Dict:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def flatten(d: Dict, prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def n_epochs(schedule) -> int:
    return len(epoch_learning_rates(schedule))


def _warn(message: str) -> None:
    print(f"vaexp: warning: {message}", file=sys.stderr, flush=True)


# -- the directory as a transaction -------------------------------------------------------------------

class RunDirBusy(VaexpError):
    pass


@dataclass(frozen=True)
class Snapshot:
    """What was in a directory when a command took it (before anything of the command's)."""
    existed: bool                 # whether the folder itself existed
    entries: frozenset            # names in it, and ".hydra/<name>" inside an existing .hydra
    created_from: Optional[Path]  # the topmost folder that did not exist (removed on rollback)


def _entries(path: Path) -> frozenset:
    names = set(os.listdir(path))
    if (path / HYDRA_DIR).is_dir():
        names |= {f"{HYDRA_DIR}/{n}" for n in os.listdir(path / HYDRA_DIR)}
    return frozenset(names)


def _missing_from(path: Path) -> Optional[Path]:
    """The topmost folder of `path` that does not exist (None when it exists)."""
    if path.exists():
        return None
    top = path
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    return top


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(path: Path) -> List[str]:
    """Temp files of writes whose process died (SIGKILL, power loss): .<name>.tmp-<pid>."""
    removed = []
    for name in os.listdir(path):
        match = _TEMP.match(name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(path / name)
                removed.append(name)
    return removed


class Transaction:
    """One command's hold on a run directory: the lock, and what existed before (see begin)."""

    def __init__(self, path: Path, keep: Tuple[str, ...], scratch: Tuple[str, ...]):
        self.path = Path(os.path.abspath(path))
        self.keep, self.scratch = keep, scratch
        self.depth, self._fd = 0, None
        self.before = Snapshot(self.path.is_dir(), frozenset(), _missing_from(self.path))

    def _acquire(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        lock_existed = (self.path / LOCK).exists()
        try:
            self._lock()
        except RunDirBusy:
            raise  # another process's directory: touch nothing
        except BaseException:
            self._remove_created_folders()  # made just now for nothing
            raise
        # The entries are listed under the lock: what appears after this is this command's.
        entries = _entries(self.path) - (frozenset() if lock_existed else {LOCK})
        self.before = Snapshot(self.before.existed, entries, self.before.created_from)

    def _remove_created_folders(self) -> None:
        """rmdir the run folder and the parents this command created, as far as they are empty."""
        top = self.before.created_from
        if top is None:
            return
        folder = self.path
        while folder.is_relative_to(top) and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()  # out_root/train/<run>, then out_root/train, ... up to what existed
            if folder == top:
                break
            folder = folder.parent

    def _lock(self) -> None:
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirBusy(f"{self.path} is in use by another vaexp process (pid {holder}); wait for it to "
                             f"finish (or stop it), or use another run directory") from None
        except OSError as err:  # a file system without locks (some network mounts): go on, and say so
            _warn(f"cannot lock {self.path} ({one_line(err)}); nothing stops another vaexp process from "
                  f"writing there at the same time")
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            os.close(fd)
            raise
        self._fd = fd
        remove_stale_temp_files(self.path)

    def holds_result(self) -> bool:
        return any((self.path / name).exists() for name in self.keep)

    def rollback(self) -> bool:
        """Remove what this command created, unless the directory holds a result (a checkpoint
        or metrics.json: then only new scratch files go). True when nothing of it is left."""
        before = self.before
        if self.holds_result():
            for name in self.scratch:
                if name not in before.entries:
                    with contextlib.suppress(OSError):
                        (self.path / name).unlink()
            return False
        with contextlib.suppress(OSError):
            for name in os.listdir(self.path):
                entry = self.path / name
                if name == HYDRA_DIR and name in before.entries and entry.is_dir():
                    for child in os.listdir(entry):
                        if f"{HYDRA_DIR}/{child}" not in before.entries:
                            _remove(entry / child)
                elif name not in before.entries:
                    _remove(entry)
            if not before.existed:
                self._remove_created_folders()
        return True

    def end(self) -> None:
        """Release one hold (begin is reentrant); the last one unlocks."""
        self.depth -= 1
        if self.depth > 0:
            return
        _OPEN.pop(_key(self.path), None)
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.end()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _key(path: Path) -> str:
    return os.path.realpath(os.path.abspath(path))


_OPEN: Dict[str, Transaction] = {}  # this process's holds, by real path


def begin(path: Path, keep: Tuple[str, ...] = (CHECKPOINT, METRICS), scratch: Tuple[str, ...] = ()) -> Transaction:
    """Hold run directory `path` for this process: snapshot what exists, create it, take the
    exclusive lock (RunDirBusy, naming the holder's pid, when another process has it) and remove
    stale temp files. Reentrant: a path this process holds already gets the same Transaction.
    `keep`: files that make the directory a result, kept on rollback; `scratch`: files removed on
    rollback anyway when new (e.g. a command's log). Raises OSError when it cannot be created."""
    tx = _OPEN.get(_key(path))
    if tx is None:
        tx = Transaction(path, tuple(keep), tuple(scratch))
        tx._acquire()
        _OPEN[_key(path)] = tx
    tx.depth += 1
    return tx


def held(path: Path) -> Optional[Transaction]:
    return _OPEN.get(_key(path))


def locked(path: Path) -> Transaction:
    """`with rundir.locked(d):` - begin/end around a block (the trainer's own hold)."""
    return begin(path)


def abandon_all() -> None:
    """At the end of a command: roll back and release what is still held (a failure before the
    command's own boundary could end it, e.g. inside Hydra before the task ran)."""
    for tx in list(_OPEN.values()):
        tx.rollback()
        tx.depth = 1
        tx.end()


# -- atomic writes ----------------------------------------------------------------------------------

def _atomic(path: Path, mode: str, write) -> None:
    """write(f) into a temp file beside `path`, fsync, then rename over `path`: a crash at any
    moment leaves the old file or the new one, never half of one (and a killed process's temp
    file is removed by the next holder of the directory)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError) and (err.filename is None or str(err.filename) == str(tmp)):
            raise OSError(err.errno, err.strerror or str(err), str(path)) from err  # name the file meant
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, "w", lambda f: f.write(text))


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save, atomically."""
    import torch  # only the writers of tensors need torch; `vaexp report` reads metrics.json without it

    _atomic(path, "wb", lambda f: torch.save(obj, f))


def _atomic_link(src: Path, dst: Path) -> None:
    """dst becomes the same file as src (a hard link: no space needed), atomically; a copy where
    links are not supported."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if err.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        _atomic(dst, "wb", lambda f: f.write(src.read_bytes()))


# -- checkpoint.pt ------------------------------------------------------------------------------------

CHECKPOINT_KEYS = ("model", "optimizer", "state", "rng", "config")
_CHECKPOINT_FIX = "restore it from a copy, or delete it to train this run again from the start"


def load_checkpoint(run_dir: Path, map_location="cpu") -> Optional[Dict[str, Any]]:
    """The checkpoint, None when there is none; VaexpError when it is damaged or not vaexp's."""
    import torch  # see atomic_save

    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location=map_location, weights_only=False)
    except (OSError, MemoryError):
        raise
    except Exception as err:  # truncated, empty, foreign: torch, zip and pickle each raise their own
        reason = "truncated, or not a torch file" if "PytorchStreamReader" in str(err) else one_line(err, 120)
        raise VaexpError(f"{path}: damaged, cannot be read ({reason}); {_CHECKPOINT_FIX}") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise VaexpError(f"{path}: not a vaexp checkpoint (no {', '.join(missing)}); {_CHECKPOINT_FIX}")
    return saved


def check_checkpoint(saved: Dict, cfg, run_dir: Path) -> None:
    """VaexpError when the checkpoint was written by a run with other settings than `cfg` (a
    checkpoint copied from another run: another architecture, objective, seed...)."""
    theirs = flatten(saved["config"]) if isinstance(saved.get("config"), dict) else {}
    ours = flatten(as_dict(cfg))
    # Keys on one side only are not compared: a schema that gained or dropped them (a config.yaml
    # from before the per-dataset schemas lists every dataset's keys); another dataset or model
    # differs in its name, which both have.
    diffs = [k for k in sorted(set(theirs) & set(ours))
             if not covers(RESUMABLE + ("hydra",), k) and theirs.get(k) != ours.get(k)]
    if diffs:
        shown = ", ".join(f"{k}={theirs.get(k)} (config.yaml: {ours.get(k)})" for k in diffs[:3])
        raise VaexpError(f"{Path(run_dir) / CHECKPOINT}: written by a run with other settings ({shown}), so it "
                         f"does not belong to this run; {_CHECKPOINT_FIX}")


def restore_model(model, saved: Dict, run_dir: Path) -> None:
    try:
        model.load_state_dict(saved["model"])
    except (RuntimeError, KeyError, TypeError) as err:
        raise VaexpError(f"{Path(run_dir) / CHECKPOINT}: holds a model that does not match config.yaml "
                         f"({one_line(err, 160)}); {_CHECKPOINT_FIX}") from None


# -- config.yaml --------------------------------------------------------------------------------------

def load_config(run_dir: Path, schema=None) -> DictConfig:
    """config.yaml (merged into `schema`, a dataclass, when given); VaexpError when unreadable."""
    path = Path(run_dir) / CONFIG
    fix = "fix or restore it (Hydra's record of the command is in .hydra/), or use another run directory"
    try:
        raw = OmegaConf.load(path)
    except (OSError, MemoryError):
        raise
    except Exception as err:  # yaml's scanner/parser errors, omegaconf's
        raise VaexpError(f"{path}: not valid YAML ({one_line(err, 160)}); {fix}") from None
    if not isinstance(raw, DictConfig):
        raise VaexpError(f"{path}: not a vaexp config (a YAML {type(raw).__name__}); {fix}")
    if schema is None:
        return raw
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), raw)
    except Exception as err:  # unknown keys, wrong types
        raise VaexpError(f"{path}: not a vaexp train config ({one_line(err, 160)}); {fix}") from None


def task_config(cfg: DictConfig) -> DictConfig:
    if "hydra" in cfg:  # a config with its hydra node (the validation callback): the task's settings only
        return OmegaConf.masked_copy(cfg, [key for key in cfg.keys() if key != "hydra"])
    return cfg


def effective_config(cfg: DictConfig, run_dir: Path, overrides: Iterable[str], schema) -> DictConfig:
    """What the run in `run_dir` runs with, without writing anything; VaexpError when the
    directory holds a run with other settings.

    A directory that already holds a run continues it: with resume=<dir> the saved config is
    used and only RESUMABLE settings given on the command line change; without resume (the same
    command re-run in the same directory) the configs must agree on everything but the
    RUNTIME_ONLY settings.
    """
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).exists():
        return cfg
    cfg = task_config(cfg)
    saved = as_dict(load_config(run_dir))
    current = as_dict(cfg)
    flat_saved, flat_cur = flatten(saved), flatten(current)
    if cfg.get("resume"):
        changed = {}
        for key in override_keys(overrides):
            if key == "resume":
                continue
            for k in [k for k in flat_cur if k == key or k.startswith(key + ".")]:
                if covers(RESUMABLE, k):
                    changed[k] = flat_cur[k]
                elif flat_cur[k] != flat_saved.get(k):
                    raise VaexpError(
                        f"resume={run_dir}: the run was trained with {k}={flat_saved.get(k)}, not {flat_cur[k]}; "
                        f"drop {key}=... (only {', '.join(RESUMABLE[:-1])} and eval.* may change "
                        f"when resuming) or start a new run")
        merged = OmegaConf.create(saved)
        for k, v in changed.items():
            OmegaConf.update(merged, k, v, force_add=True)
        merged["resume"] = str(run_dir)
        try:
            return OmegaConf.merge(OmegaConf.structured(schema), merged)
        except Exception as err:
            raise VaexpError(f"{run_dir / CONFIG}: not a vaexp train config ({one_line(err, 160)}); fix or "
                             f"restore it, or use another run directory") from None
    # A saved key the current config lacks is not compared: it belongs to a schema that has
    # dropped it (a config.yaml from before the per-dataset schemas lists every dataset's keys);
    # a different dataset or model differs in its name, which both have.
    diffs = [k for k in sorted(flat_cur)
             if not covers(RUNTIME_ONLY, k) and flat_saved.get(k) != flat_cur.get(k)]
    if diffs:
        shown = ", ".join(f"{k}={flat_cur.get(k)} (saved: {flat_saved.get(k)})" for k in diffs[:4])
        if all(covers(RESUMABLE, k) for k in diffs):
            new = " ".join(f"{k}={flat_cur.get(k)}" for k in diffs[:4])
            saved_as = ", ".join(f"{k}={flat_saved.get(k)}" for k in diffs[:4])
            evals = " ".join(f"{k}={flat_cur.get(k)}" for k in diffs[:4] if k.startswith("eval."))
            raise VaexpError(f"{run_dir} already holds this run, recorded with {saved_as}; to change that, continue "
                             f"it with resume={run_dir} {new}" + (f" (or `vaexp eval {run_dir} {evals}` to evaluate "
                                                                  f"it again)" if evals else ""))
        raise VaexpError(f"{run_dir} already holds a run with other settings: {shown}; "
                         f"use a new run directory, or resume={run_dir} to continue that run as it was")
    return cfg


def _described(cfg) -> Dict[str, Any]:
    """A config's settings, without the runtime-only ones (they do not describe the run)."""
    return {k: v for k, v in flatten(as_dict(cfg)).items() if not covers(RUNTIME_ONLY, k)}


def record_config(cfg: DictConfig, run_dir: Path) -> None:
    """Write config.yaml on a run's first start; when a resume changed a setting (schedule.epochs,
    eval.*), write the new one and keep the old one as config.<time>.yaml."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG
    text = OmegaConf.to_yaml(OmegaConf.create(as_dict(cfg)))
    if not path.exists():
        atomic_write_text(path, text)
        return
    if _described(load_config(run_dir)) == _described(cfg):
        return
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    backup, i = run_dir / f"config.{stamp}.yaml", 1
    while backup.exists():
        backup, i = run_dir / f"config.{stamp}-{i}.yaml", i + 1
    atomic_write_text(backup, path.read_text())  # the old one first: config.yaml is never missing
    atomic_write_text(path, text)


# -- metrics.json -------------------------------------------------------------------------------------
#
# {"run":   {"state": "training" | "trained" | "diverged", "epoch", "global_step", "epochs" (the
#            configured length), "message" (diverged), "time"}  -- where training stands;
#  "train": the summary of the training (bound, valid_bound, epochs done, steps, wall time, device,
#           data source);
#  "test":  the latest evaluation's metrics;
#  "evals": every evaluation: its metrics, "settings" (the eval.* it used), "checkpoint" (epoch,
#           step, global_step, epochs configured, finished, diverged), "by" (train | eval), "time",
#           "per_example" (its test_log_px.<i>.pt)}

def _shape_problem(data: Any) -> Optional[str]:
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    for key in ("train", "test", "run"):
        if key in data and not isinstance(data[key], dict):
            return f"its '{key}' is not an object"
    evals = data.get("evals", [])
    if not isinstance(evals, list) or not all(isinstance(e, dict) for e in evals):
        return "its 'evals' is not a list of objects"
    for entry in evals + ([data["test"]] if "test" in data else []):
        if not isinstance(entry.get("nll"), (int, float, type(None))):
            return "an evaluation without a number 'nll'"
    return None


def read_metrics(run_dir: Path) -> Tuple[Optional[Dict], Optional[str]]:
    """(metrics, None); (None, None) when there is no metrics.json; (None, why) when it is
    unreadable (not JSON, or JSON of another shape)."""
    path = Path(run_dir) / METRICS
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, None
    try:
        data = json.loads(text)
    except ValueError as err:
        return None, f"not valid JSON ({one_line(err, 120)})"
    why = _shape_problem(data)
    return (None, why) if why else (data, None)


def _metrics_for_update(run_dir: Path) -> Dict:
    """metrics.json to add to; an unreadable one is moved aside (metrics.json.corrupt-<time>)."""
    data, why = read_metrics(run_dir)
    if why is not None:
        path = Path(run_dir) / METRICS
        aside = path.with_name(f"{METRICS}.corrupt-{time.strftime('%Y-%m-%d_%H-%M-%S')}")
        i = 1
        while aside.exists():
            aside, i = path.with_name(f"{METRICS}.corrupt-{time.strftime('%Y-%m-%d_%H-%M-%S')}-{i}"), i + 1
        os.replace(path, aside)
        _warn(f"{path} was unreadable ({why}); it is kept as {aside.name} and a new {METRICS} is started")
    return data or {}


def _write_metrics(run_dir: Path, data: Dict) -> None:
    atomic_write_text(Path(run_dir) / METRICS, json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")


def training_record(state: Dict, epochs: int, status: str, message: Optional[str] = None) -> Dict:
    record = {"state": status, "epoch": state["epoch"], "global_step": state["global_step"], "epochs": epochs,
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if message:
        record["message"] = message
    return record


def checkpoint_record(state: Dict, epochs: int, diverged: bool = False) -> Dict:
    """What an evaluation entry says about the checkpoint it evaluated."""
    return {"epoch": state["epoch"], "step": state["step"], "global_step": state["global_step"], "epochs": epochs,
            "finished": state["epoch"] >= epochs and not diverged, "diverged": diverged}


def record_training(run_dir: Path, record: Dict, train: Optional[Dict] = None, create: bool = True) -> None:
    """Set metrics.json's "run" record (and the "train" summary). create=False: only when
    metrics.json exists already (a resumed run with earlier evaluations)."""
    if not create and not (Path(run_dir) / METRICS).exists():
        return
    data = _metrics_for_update(run_dir)
    data["run"] = record
    if train is not None:
        data["train"] = train
    _write_metrics(run_dir, data)


def record_curve_point(run_dir: Path, point: Dict) -> None:
    """Add an evaluation made during training (eval.every) to metrics.json's "curve": its epoch,
    step, test NLL and what estimated it (the report plots NLL against epoch). Points from its
    epoch on are replaced: after a resume from an earlier checkpoint they belong to a lost future."""
    data = _metrics_for_update(run_dir)
    data["curve"] = [p for p in data.get("curve", []) if p.get("epoch", 0) < point["epoch"]] + [point]
    _write_metrics(run_dir, data)


def _next_per_eval_index(run_dir: Path, evals: List[Dict]) -> int:
    used = [int(m.group(1)) for m in map(_PER_EVAL.match, os.listdir(run_dir)) if m]
    used += [int(m.group(1)) for m in (_PER_EVAL.match(str(e.get("per_example", ""))) for e in evals) if m]
    return max(used) + 1 if used else len(evals)


def record_evaluation(run_dir: Path, metrics: Dict, per_example: Optional[Dict[str, Any]], settings: Dict,
                      checkpoint: Dict, by: str) -> Dict:
    """Add one evaluation to metrics.json (as the latest, "test") with the eval settings and the
    checkpoint it used; its per-image values go to a new test_log_px.<i>.pt (never over another
    evaluation's) and test_log_px.pt. Returns the new metrics.json."""
    run_dir = Path(run_dir)
    data = _metrics_for_update(run_dir)
    evals = list(data.get("evals", []))
    entry = {**metrics, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "settings": settings,
             "checkpoint": checkpoint, "by": by}
    new_file = None
    if per_example is not None:
        new_file = run_dir / f"test_log_px.{_next_per_eval_index(run_dir, evals)}.pt"
        entry["per_example"] = new_file.name
        atomic_save({k: v.cpu() for k, v in per_example.items()}, new_file)
    data["test"] = dict(metrics)
    data["evals"] = evals + [entry]
    try:
        _write_metrics(run_dir, data)
    except BaseException:
        if new_file is not None:  # not recorded anywhere: it must not look like a result
            with contextlib.suppress(OSError):
                new_file.unlink()
        raise
    if new_file is not None:
        _atomic_link(new_file, run_dir / PER_EXAMPLE)
    return data


def judge(metrics: Optional[Dict], epochs: Optional[int]) -> Tuple[str, str]:
    """("finished" | "diverged" | "unfinished", why) of a run from its metrics.json and the
    configured number of epochs. Finished: its last evaluation is of its last checkpoint, and
    that checkpoint is at the configured length."""
    if metrics is None:
        return "unfinished", "no metrics.json"
    run = metrics.get("run") or {}
    if run.get("state") == "diverged":
        return "diverged", run.get("message") or "training diverged"
    evals = metrics.get("evals") or []
    if not evals:
        if run.get("state") == "trained":
            return "unfinished", "trained but not evaluated (vaexp eval <dir> evaluates it)"
        return "unfinished", "no evaluation yet"
    ck = evals[-1].get("checkpoint")
    if not isinstance(ck, dict):
        return "unfinished", ("metrics.json does not say which checkpoint was evaluated (written by an older "
                              "vaexp); vaexp eval <dir> evaluates it again")
    if run.get("state") == "training" or (run and run.get("global_step") != ck.get("global_step")):
        return "unfinished", (f"training went on after the last evaluation (of epoch {ck.get('epoch')}); "
                              f"now at epoch {run.get('epoch')} of {run.get('epochs')}")
    if ck.get("diverged"):
        return "diverged", "its last evaluation is of the last good checkpoint before training diverged"
    if epochs is not None and ck.get("epoch") != epochs:
        return "unfinished", f"its last evaluation is of epoch {ck.get('epoch')} of {epochs}"
    return "finished", ""


def configured_epochs(config: Any) -> Optional[int]:
    """The configured number of epochs of a config.yaml (a dict or DictConfig), None if unknown."""
    try:
        schedule = config["schedule"]
        return n_epochs(OmegaConf.create(schedule) if isinstance(schedule, dict) else schedule)
    except Exception:  # a hand-edited or foreign config: the report says "unknown"
        return None


def finished_metrics(run_dir: Path, cfg) -> Optional[Dict]:
    """metrics.json of a run that is finished at cfg's schedule (and whose last evaluation is of
    the checkpoint on disk), else None. Reads the checkpoint (torch)."""
    metrics, _ = read_metrics(run_dir)
    if judge(metrics, n_epochs(cfg.schedule))[0] != "finished":
        return None
    saved = load_checkpoint(run_dir)
    ck = metrics["evals"][-1]["checkpoint"]
    return metrics if saved is not None and saved["state"]["global_step"] == ck.get("global_step") else None


def json_safe(value):
    """Plain JSON: NaN/inf (e.g. no validation set) become null, tensors and numpy scalars floats."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    value = float(value)
    return value if math.isfinite(value) else None


# -- TensorBoard's HPARAMS table -------------------------------------------------------------------

# Its settings columns: name -> config key. A key the runs are compared on (varied_keys) that is
# not here becomes a column of its own, named by its key.
HPARAMS = {"dataset": "dataset.name", "model": "model.name", "objective": "objective.name",
           "estimator": "estimator.name", "m": "m", "k": "k", "beta": "beta", "seed": "seed",
           "schedule": "schedule.name", "lr": "schedule.lr", "batch_size": "batch_size"}
# Keys that are never settings columns: how a run executes, where its data were read from, and
# the evaluation (its test images and K are metric columns, as a later `vaexp eval` may change them).
_NOT_HPARAMS = RUNTIME_ONLY + ("experiment", "hydra", "dataset.path", "dataset.data_dir", "dataset.download",
                               "eval")
MULTIRUN_RECORD = "multirun.yaml"   # Hydra's record of a sweep, in the sweep directory
OVERRIDES_RECORD = ".hydra/overrides.yaml"   # Hydra's record of a run's command line


def varied_keys(run_dir: Path) -> List[str]:
    """The config keys a run is compared on: for a sweep job, those its sweep varies (the sweeps
    on the command line and an experiment preset's hydra.sweeper.params, from the sweep's
    multirun.yaml); for a run of its own, those its command line set. [] when neither record
    exists (a run not started by the CLI)."""
    run_dir = Path(run_dir)
    parser = OverridesParser.create()
    keys: List[str] = []
    try:
        sweep_file = run_dir.parent / MULTIRUN_RECORD
        if sweep_file.is_file():
            sweep = OmegaConf.load(sweep_file)
            given = parser.parse_overrides([str(o) for o in sweep.hydra.overrides.task])
            fixed = {o.get_key_element().lstrip("+~") for o in given if not o.is_sweep_override()}
            params = OmegaConf.select(sweep, "hydra.sweeper.params") or {}
            keys = [key for key in params if key not in fixed]
            keys += [o.get_key_element().lstrip("+~") for o in given if o.is_sweep_override()]
            if "mk" in keys or ("m" in keys and sweep.get("mk") is not None):
                keys.append("k")  # k = mk/m varies with them
        elif (run_dir / OVERRIDES_RECORD).is_file():
            given = parser.parse_overrides([str(o) for o in OmegaConf.load(run_dir / OVERRIDES_RECORD)])
            keys = [o.get_key_element().lstrip("+~") for o in given]
    except Exception:  # noqa: BLE001 - a damaged record costs the table its highlighting, not the run
        return []
    return list(dict.fromkeys(k for k in keys if not covers(_NOT_HPARAMS, k) and not k.startswith("hydra/")))


def hparams(cfg, varied: Iterable[str] = ()) -> Tuple[Dict[str, Any], List[str]]:
    """The HPARAMS table's settings of a run, and which of them its runs are compared on
    (`varied`: config keys, e.g. from varied_keys): (name -> value, names)."""
    by_key = {key: name for name, key in HPARAMS.items()}
    values = {name: OmegaConf.select(cfg, key) for name, key in HPARAMS.items()}
    differs = []
    for key in varied:
        name = by_key.get(key) or by_key.get(f"{key}.name") or key
        if name not in values:
            value = OmegaConf.select(cfg, key)
            values[name] = str(OmegaConf.to_container(value)) if OmegaConf.is_config(value) else value
        differs.append(name)
    return values, list(dict.fromkeys(differs))
