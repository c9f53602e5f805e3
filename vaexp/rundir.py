"""THE run-directory layout: file names, which config keys mean what, atomic writes, metrics.json.

A run directory (outputs/train/<time>_<dataset>_<model>_<objective>_m<M>_k<K>_<estimator>/, or a
sweep job's <sweep>/<overrides>/) holds:
  config.yaml      the resolved config (written on the first start; a resume that changes a
                   RESUMABLE key keeps the old one as config.<time>.yaml)
  checkpoint.pt    model, optimizer, schedule position, RNG states
  metrics.json     the train summary, the latest test metrics, every evaluation under "evals"
  test_log_px.<i>.pt / test_log_px.pt   per-image fp64 estimates of evaluation i / of the latest
  error.txt        a failed sweep job's message;  events.out.tfevents.*  TensorBoard
Invariants: every file is written to a temp file in the same folder and renamed over the old one,
so a crash leaves the old file or the new one; the key classes below are the only lists of
"which settings change what a run computes" - the trainer, the sweep planner, the report and
train.yaml's exclude_keys (checked by a test) all read them from here.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from vaexp.errors import VaexpError
from vaexp.schedule import epoch_learning_rates

CONFIG = "config.yaml"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
PER_EXAMPLE = "test_log_px.pt"
ERROR_FILE = "error.txt"

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


# -- atomic writes ----------------------------------------------------------------------------------

def _atomic(path: Path, mode: str, write) -> None:
    """write(f) into a temp file beside `path`, fsync, then rename over `path`: a crash at any
    moment leaves the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, "w", lambda f: f.write(text))


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save, atomically."""
    import torch  # only the writers of tensors need torch; `vaexp report` reads metrics.json without it

    _atomic(path, "wb", lambda f: torch.save(obj, f))


def load_checkpoint(run_dir: Path, map_location="cpu") -> Optional[Dict[str, Any]]:
    import torch  # see atomic_save

    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    return torch.load(path, map_location=map_location, weights_only=False)


# -- config.yaml --------------------------------------------------------------------------------------

def prepare(cfg: DictConfig, run_dir: Path, overrides: Iterable[str], schema) -> DictConfig:
    """The config to run with in `run_dir`; writes config.yaml on a first start, and again (the
    old one kept as config.<time>.yaml) when a resume changes a RESUMABLE setting."""
    run_dir = Path(run_dir)
    saved_path = run_dir / CONFIG
    effective = effective_config(cfg, run_dir, overrides, schema)
    text = OmegaConf.to_yaml(OmegaConf.create(as_dict(effective)))
    if not saved_path.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(saved_path, text)
    elif cfg.get("resume") and text != OmegaConf.to_yaml(OmegaConf.create(as_dict(OmegaConf.load(saved_path)))):
        saved_path.rename(run_dir / f"config.{time.strftime('%Y-%m-%d_%H-%M-%S')}.yaml")
        atomic_write_text(saved_path, text)
    return effective


def effective_config(cfg: DictConfig, run_dir: Path, overrides: Iterable[str], schema) -> DictConfig:
    """What `prepare` will run with, without writing anything; raises VaexpError when the
    directory holds a run with other settings.

    A directory that already holds a run continues it: with resume=<dir> the saved config is
    used and only RESUMABLE settings given on the command line change; without resume (the same
    command re-run in the same directory) the configs must agree on everything else.
    """
    run_dir = Path(run_dir)
    saved_path = run_dir / CONFIG
    if not saved_path.exists():
        return cfg
    if "hydra" in cfg:  # called from the validation callback: compare the task's settings only
        cfg = OmegaConf.masked_copy(cfg, [key for key in cfg.keys() if key != "hydra"])
    saved = as_dict(OmegaConf.load(saved_path))
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
        return OmegaConf.merge(OmegaConf.structured(schema), merged)
    # A saved key the current config lacks is not compared: it belongs to a schema that has
    # dropped it (a config.yaml from before the per-dataset schemas lists every dataset's keys);
    # a different dataset or model differs in its name, which both have.
    diffs = [k for k in sorted(flat_cur)
             if not covers(RESUMABLE, k) and flat_saved.get(k) != flat_cur.get(k)]
    if diffs:
        shown = ", ".join(f"{k}={flat_cur.get(k)} (saved: {flat_saved.get(k)})" for k in diffs[:4])
        raise VaexpError(f"{run_dir} already holds a run with other settings: {shown}; "
                         f"use a new run directory, or resume={run_dir} to continue that run as it was")
    return cfg


# -- metrics.json -------------------------------------------------------------------------------------

def finished(run_dir: Path) -> Optional[Dict]:
    """metrics.json of a run that completed training and evaluation, else None."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def more_epochs(cfg, run_dir: Path) -> bool:
    """True when the schedule asks for more epochs than the run's checkpoint has done (a finished
    run resumed with a larger schedule.epochs)."""
    saved = load_checkpoint(run_dir)
    return saved is not None and saved["state"]["epoch"] < len(epoch_learning_rates(cfg.schedule))


def write_metrics(run_dir: Path, summary: Dict, per_example: Optional[Dict[str, Any]] = None,
                  append_eval: bool = False) -> Dict:
    """Write metrics.json atomically. append_eval keeps what was there and records the new test
    metrics as the latest, adding them to the list of evaluations."""
    run_dir = Path(run_dir)
    old = finished(run_dir) or {}
    if append_eval:
        data = dict(old)
        data["test"] = summary["test"]
    else:
        data = dict(summary)
    entry = dict(summary["test"])
    entry["time"] = time.strftime("%Y-%m-%d %H:%M:%S")
    data["evals"] = list(old.get("evals", [])) + [entry]
    if per_example is not None:
        # One file per evaluation (named in its "evals" entry), and the latest as test_log_px.pt.
        tensors = {k: v.cpu() for k, v in per_example.items()}
        name = f"test_log_px.{len(data['evals']) - 1}.pt"
        data["evals"][-1]["per_example"] = name
        atomic_save(tensors, run_dir / name)
        atomic_save(tensors, run_dir / PER_EXAMPLE)
    atomic_write_text(run_dir / METRICS, json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")
    return data


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


def remove_unstarted(run_dir: Path) -> None:
    """Remove a run directory that this command created and that holds no training yet (no
    checkpoint, no metrics): only vaexp's and Hydra's own records are deleted."""
    import shutil

    run_dir = Path(run_dir)
    if (run_dir / CHECKPOINT).exists() or (run_dir / METRICS).exists():
        return
    for entry in run_dir.iterdir():
        if entry.name == ".hydra" and entry.is_dir():
            shutil.rmtree(entry)
        elif entry.name in (CONFIG, "train.log") or entry.name.startswith("events.out.tfevents"):
            entry.unlink()
    if not any(run_dir.iterdir()):
        run_dir.rmdir()


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
