"""metrics.json: where training stands, the train summary, every evaluation, and the verdict.

Invariants: each evaluation records the eval settings and the checkpoint it used, and its
per-image values go to a new file (never over another evaluation's); an unreadable metrics.json
is moved aside, never dropped; :func:`judge` is the one definition of "finished" (the last
evaluation is of the last checkpoint, at the configured length, not diverged).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import OmegaConf

from vaexp.errors import one_line

from vaexp.rundir.files import _atomic_link, atomic_save, atomic_write_text, load_checkpoint
from vaexp.rundir.layout import METRICS, PER_EVAL_FILE, PER_EXAMPLE, n_epochs, warn

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
        warn(f"{path} was unreadable ({why}); it is kept as {aside.name} and a new {METRICS} is started")
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
    used = [int(m.group(1)) for m in map(PER_EVAL_FILE.match, os.listdir(run_dir)) if m]
    used += [int(m.group(1)) for m in (PER_EVAL_FILE.match(str(e.get("per_example", ""))) for e in evals) if m]
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
    the checkpoint on disk, or whose checkpoint was deleted: its results are all in metrics.json),
    else None. Reads the checkpoint (torch)."""
    metrics, _ = read_metrics(run_dir)
    if judge(metrics, n_epochs(cfg.schedule))[0] != "finished":
        return None
    saved = load_checkpoint(run_dir)
    ck = metrics["evals"][-1]["checkpoint"]
    return metrics if saved is None or saved["state"]["global_step"] == ck.get("global_step") else None


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


