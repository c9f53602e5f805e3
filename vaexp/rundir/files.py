"""Files of a run directory written atomically, and read with one clear line when damaged.

Invariants: every write goes to a temp file in the same folder, is fsync'ed and renamed over the
old one, so a crash leaves the old file or the new one; a checkpoint or config.yaml that cannot
be read, or belongs to another run, is a VaexpError naming the file and the fix.
"""
from __future__ import annotations

import contextlib
import copy
import errno
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

from omegaconf import DictConfig, OmegaConf

from vaexp.errors import VaexpError, one_line

from vaexp.rundir.layout import (CHECKPOINT, CONFIG, DATA_PATH_KEYS, RESUMABLE, RUNTIME_ONLY, absolute_data_paths,
                                as_dict, covers, flatten, override_keys)


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
        # torch.save turns a failed write (a full disk) into a RuntimeError of its own ("unexpected
        # pos ..."), raised while handling the OSError: report that OSError.
        cause = err if isinstance(err, OSError) else _os_error_within(err)
        if cause is not None and (cause.filename is None or str(cause.filename) == str(tmp)):
            raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from err  # name the file meant
        raise


def _os_error_within(err: BaseException, depth: int = 5) -> Optional[OSError]:
    """The OSError among the exceptions `err` was raised while handling, if any."""
    for _ in range(depth):
        err = err.__context__
        if err is None or isinstance(err, OSError):
            return err
    return None


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, "w", lambda f: f.write(text))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, "wb", lambda f: f.write(data))


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
    except BaseException as err:  # a signal too: no temp link left behind
        with contextlib.suppress(OSError):
            tmp.unlink()
        if not isinstance(err, OSError) or err.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP,
                                                             errno.EOPNOTSUPP):
            raise
        _atomic(dst, "wb", lambda f: f.write(src.read_bytes()))


# -- checkpoint.pt ------------------------------------------------------------------------------------

CHECKPOINT_KEYS = ("model", "optimizer", "state", "rng", "config")
_CHECKPOINT_FIX = ("restore it from a copy, or delete it and metrics.json to train this run again from the "
                   "start")


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
    theirs = absolute_data_paths(flatten(saved["config"])) if isinstance(saved.get("config"), dict) else {}
    ours = absolute_data_paths(flatten(as_dict(cfg)))
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


class RunDirTaken(VaexpError):
    """The directory holds a run (or another command's output) that this command is not: refused,
    and nothing of this command's (a sweep job's error.txt) is written into it."""


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
    flat_saved, flat_cur = absolute_data_paths(flatten(saved)), absolute_data_paths(flatten(current))
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
                        f"drop {key}=... (only {_resumable(flat_cur)} may change when resuming) or start a "
                        f"new run")
        merged = OmegaConf.create(saved)
        for k, v in changed.items():
            OmegaConf.update(merged, k, v, force_add=True)
        merged["resume"] = str(run_dir)
        try:
            return OmegaConf.merge(OmegaConf.structured(schema), merged)
        except Exception as err:
            raise VaexpError(f"{run_dir / CONFIG}: not a vaexp train config ({one_line(err, 160)}); fix or "
                             f"restore it, or use another run directory") from None
    # Another command's output (vaexp snr's config.yaml has no estimator or schedule): not a run,
    # so neither "continue it" nor resume= applies.
    if not all(isinstance(saved.get(key), dict) for key in ("objective", "estimator", "schedule")):
        raise RunDirTaken(f"{run_dir} holds the output of another command ({run_dir / CONFIG} is not a vaexp "
                         f"train config); use a new run directory")
    # A saved key the current config lacks is not compared: it belongs to a schema that has
    # dropped it (a config.yaml from before the per-dataset schemas lists every dataset's keys);
    # a different dataset or model differs in its name, which both have.
    # With the diagnostics off in both, their other settings do nothing: not a difference (a
    # config.yaml from before gdreg's default alpha became 0.9 holds diagnostics.alpha: 0.5).
    idle = flat_saved.get("diagnostics.every") is None and flat_cur.get("diagnostics.every") is None
    diffs = [k for k in sorted(flat_cur)
             if not covers(RUNTIME_ONLY, k) and not (idle and covers(("diagnostics",), k))
             and flat_saved.get(k) != flat_cur.get(k)]
    if diffs:
        shown = ", ".join(f"{k}={flat_cur.get(k)} (saved: {flat_saved.get(k)})" for k in diffs[:4])
        if all(covers(RESUMABLE, k) for k in diffs):
            new = " ".join(f"{k}={flat_cur.get(k)}" for k in diffs[:4])
            saved_as = ", ".join(f"{k}={flat_saved.get(k)}" for k in diffs[:4])
            evals = " ".join(f"{k}={flat_cur.get(k)}" for k in diffs[:4] if k.startswith("eval."))
            if all(k.startswith("eval.") for k in diffs):  # resume= refuses new eval settings once finished
                raise RunDirTaken(f"{run_dir} already holds this run, recorded with {saved_as}; `vaexp eval "
                                  f"{run_dir} {evals}` evaluates it with these (or resume={run_dir} {new} while "
                                  f"it has epochs left to train)")
            raise RunDirTaken(f"{run_dir} already holds this run, recorded with {saved_as}; to change that, continue "
                             f"it with resume={run_dir} {new}" + (f" (or `vaexp eval {run_dir} {evals}` to evaluate "
                                                                  f"it again)" if evals else ""))
        raise RunDirTaken(f"{run_dir} already holds a run with other settings: {shown}; "
                         f"use a new run directory, or resume={run_dir} to continue that run as it was")
    return cfg


def _resumable(flat: Dict[str, Any]) -> str:
    """RESUMABLE as a user writes it: a group of settings as <group>.*."""
    user = [k for k in RESUMABLE if k not in ("out_root", "resume", "sweep")]
    return ", ".join(f"{k}.*" if any(x.startswith(k + ".") for x in flat) else k for k in user)


def described(cfg) -> Dict[str, Any]:
    """A config (or its dict) as settings are compared: flattened, data paths absolute, vaexp snr's
    run= resolved (a run named by a relative path, or through a link, is the same), without the
    runtime-only ones (they do not describe the run)."""
    flat = absolute_data_paths(flatten(cfg if isinstance(cfg, dict) else as_dict(cfg)))
    if isinstance(flat.get("run"), str) and flat["run"]:
        flat["run"] = os.path.realpath(os.path.expanduser(flat["run"]))
    return {k: v for k, v in flat.items() if not covers(RUNTIME_ONLY, k)}


def with_absolute_data_paths(cfg: DictConfig) -> DictConfig:
    """A copy of a run's config with dataset.path / dataset.data_dir absolute (see
    layout.absolute_data_paths): what the run reads and records."""
    flat = flatten(as_dict(cfg))
    fixed = absolute_data_paths(flat)
    if fixed == flat:
        return cfg
    cfg = copy.deepcopy(cfg)
    for key in DATA_PATH_KEYS:
        if fixed.get(key) != flat.get(key):
            OmegaConf.update(cfg, key, fixed[key], merge=False)
    return cfg


def record_config(cfg: DictConfig, run_dir: Path) -> None:
    """Write config.yaml on a run's first start; when a resume changed a setting (schedule.epochs,
    eval.*), write the new one and keep the old one as config.<time>.yaml."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG
    text = OmegaConf.to_yaml(OmegaConf.create(as_dict(cfg)))
    if not path.exists():
        atomic_write_text(path, text)
        return
    if described(load_config(run_dir)) == described(cfg):
        return
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    backup, i = run_dir / f"config.{stamp}.yaml", 1
    while backup.exists():
        backup, i = run_dir / f"config.{stamp}-{i}.yaml", i + 1
    atomic_write_text(backup, path.read_text())  # the old one first: config.yaml is never missing
    atomic_write_text(path, text)


