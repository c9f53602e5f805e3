"""THE run-directory layout: its file names, which config keys mean what, small helpers.

Invariant: these are the only lists of file names and of "which settings change what a run
computes" (the key classes); the trainer, the sweep planner, the report and train.yaml's
exclude_keys (checked by a test) read them from here. No torch at import.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import yaml
from omegaconf import OmegaConf

from vaexp.schedule import epoch_learning_rates

CONFIG = "config.yaml"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
PER_EXAMPLE = "test_log_px.pt"
ERROR_FILE = "error.txt"
SNR_CSV = "snr.csv"                                  # what `vaexp snr` measured (its output directory)
LOCK = ".vaexp.lock"
HYDRA_DIR = ".hydra"
TEMP_FILE = re.compile(r"^\..+\.tmp-(\d+)$")          # what _atomic writes before its rename
PER_EVAL_FILE = re.compile(r"^test_log_px\.(\d+)\.pt$")

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
DATA_SOURCE_KEYS = ("dataset.path", "dataset.data_dir", "dataset.download")  # where the data were read from
DATA_PATH_KEYS = ("dataset.path", "dataset.data_dir")
NOT_A_SETTING = RUNTIME_ONLY + ("seed", "mk") + DATA_SOURCE_KEYS + ("eval.chunk", "eval.every", "diagnostics")
# Settings that name a directory or file (sweep: a directory's name), each command having some:
# given empty (`out_root=$OUT` with OUT unset) they would mean the file-system root or the
# working directory, so an empty one is refused. In the order a message names the first.
PATH_SETTINGS = ("resume", "run", "out_root", "sweep", "out", "hydra.run.dir", "hydra.sweep.dir") + DATA_PATH_KEYS


def quantity_key(quantity: str) -> str:
    """The key of what a run trains on, in metrics.json's train section and TensorBoard tags:
    "bound" -> train.bound, epoch/train_bound; "JVI estimate" (jvi: not a bound) -> jvi_estimate."""
    return quantity.lower().replace(" ", "_")


def last_trained(history: List[Dict[str, Any]], quantity: str) -> Dict[str, Any]:
    """metrics.json's train values of a run's last epoch (its history, as the checkpoint holds it),
    named by what it trains on: {"quantity", <slug>, valid_<slug>} (NaN before the first epoch)."""
    slug, last = quantity_key(quantity), history[-1] if history else {}
    return {"quantity": quantity, slug: last.get("train_bound", float("nan")),
            f"valid_{slug}": last.get("valid_bound", float("nan"))}


def lk_keys(keys: Iterable[str]) -> List[str]:
    """The L_k bounds among metric keys ("L1", "L64", "L5000"), in order of k."""
    return sorted({k for k in keys if k.startswith("L") and k[1:].isdigit()}, key=lambda k: int(k[1:]))


def hydra_job(directory) -> Optional[str]:
    """The command Hydra's record in directory/.hydra/ is of ("?" when unreadable); None without one."""
    path = Path(directory) / HYDRA_DIR / "hydra.yaml"
    if not path.is_file():
        return None
    try:
        return str(yaml.safe_load(path.read_text())["hydra"]["job"]["name"])
    except Exception:  # noqa: BLE001 - damaged or not Hydra's: no command's record
        return "?"


def absolute_data_paths(flat: Dict[str, Any]) -> Dict[str, Any]:
    """A flattened config with dataset.path / dataset.data_dir absolute (~ expanded, relative to
    the working directory): how runs record them (config.yaml names the files a later `vaexp
    eval` or resume= from another directory must read) and how settings are compared (a run
    recorded with the path as typed, by an older vaexp, is the same run)."""
    out = dict(flat)
    for key in DATA_PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and value:
            out[key] = os.path.abspath(os.path.expanduser(value))
    return out


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


def warn(message: str) -> None:
    print(f"vaexp: warning: {message}", file=sys.stderr, flush=True)



MULTIRUN_RECORD = "multirun.yaml"            # Hydra's record of a sweep, in the sweep directory
OVERRIDES_RECORD = ".hydra/overrides.yaml"   # Hydra's record of a run's command line
