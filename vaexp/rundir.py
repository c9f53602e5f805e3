"""A run directory: its config (written once, the source of truth), metrics.json, TensorBoard.

Layout of outputs/train/<time>_<dataset>_<model>_<objective>_m<M>_k<K>_<estimator>/:
  config.yaml        resolved config of the run (never rewritten)
  checkpoint.pt      model, optimizer, schedule position, RNG states (atomic)
  metrics.json       final train/test metrics, plus every later `vaexp eval` under "evals"
  test_log_px.pt     per-example test log-likelihood estimates (fp64) of the latest evaluation;
                     test_log_px.<i>.pt of evaluation i (named in metrics.json's "evals")
  events.out.tfevents.*  TensorBoard
  .hydra/            Hydra's record of the command line
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from vaexp.errors import VaexpError

CONFIG = "config.yaml"
METRICS = "metrics.json"
PER_EXAMPLE = "test_log_px.pt"

# Settings that may differ when a run is continued: they do not change what is trained.
RESUMABLE = ("resume", "device", "progress", "log_every", "out_root", "schedule.epochs", "eval",
             "fast", "stack")


def plain(cfg) -> Dict:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def _flatten(d: Dict, prefix: str = "") -> Dict[str, object]:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _resumable(key: str) -> bool:
    return any(key == r or key.startswith(r + ".") for r in RESUMABLE)


def _override_keys(overrides: Iterable[str]) -> List[str]:
    keys = []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        keys.append(key)
    return keys


def prepare(cfg: DictConfig, run_dir: Path, overrides: Iterable[str], schema) -> DictConfig:
    """The config to run with in `run_dir`; writes config.yaml on a first start, and again (the
    old one kept as config.<time>.yaml) when a resume changes a RESUMABLE setting."""
    run_dir = Path(run_dir)
    saved_path = run_dir / CONFIG
    effective = effective_config(cfg, run_dir, overrides, schema)
    text = OmegaConf.to_yaml(OmegaConf.create(plain(effective)))
    if not saved_path.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_text(saved_path, text)
    elif cfg.get("resume") and text != OmegaConf.to_yaml(OmegaConf.create(plain(OmegaConf.load(saved_path)))):
        saved_path.rename(run_dir / f"config.{time.strftime('%Y-%m-%d_%H-%M-%S')}.yaml")
        _write_text(saved_path, text)
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
    saved = plain(OmegaConf.load(saved_path))
    current = plain(cfg)
    flat_saved, flat_cur = _flatten(saved), _flatten(current)
    if cfg.get("resume"):
        keys = _override_keys(overrides)
        changed = {}
        for key in keys:
            if key == "resume":
                continue
            hits = [k for k in flat_cur if k == key or k.startswith(key + ".")]
            for k in hits:
                if _resumable(k):
                    changed[k] = flat_cur[k]
                elif flat_cur[k] != flat_saved.get(k):
                    raise VaexpError(
                        f"resume={run_dir}: the run was trained with {k}={flat_saved.get(k)}, not {flat_cur[k]}; "
                        f"drop {key}=... (only device, progress, log_every, fast, stack, schedule.epochs and eval.* may change "
                        f"when resuming) or start a new run")
        merged = OmegaConf.create(saved)
        for k, v in changed.items():
            OmegaConf.update(merged, k, v, force_add=True)
        merged["resume"] = str(run_dir)
        return OmegaConf.merge(OmegaConf.structured(schema), merged)
    diffs = [k for k in sorted(set(flat_saved) | set(flat_cur))
             if not _resumable(k) and flat_saved.get(k) != flat_cur.get(k)]
    if diffs:
        shown = ", ".join(f"{k}={flat_cur.get(k)} (saved: {flat_saved.get(k)})" for k in diffs[:4])
        raise VaexpError(f"{run_dir} already holds a run with other settings: {shown}; "
                         f"use a new run directory, or resume={run_dir} to continue that run as it was")
    return cfg


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
    from vaexp.checkpoint import load
    from vaexp.schedule import epoch_learning_rates

    saved = load(run_dir)
    return saved is not None and saved["state"]["epoch"] < len(epoch_learning_rates(cfg.schedule))


def write_metrics(run_dir: Path, summary: Dict, per_example: Optional[Dict[str, torch.Tensor]] = None,
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
    _write_text(run_dir / METRICS, json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n")
    if per_example is not None:
        from vaexp.checkpoint import atomic_save

        # One file per evaluation (named in its "evals" entry), and the latest as test_log_px.pt.
        tensors = {k: v.cpu() for k, v in per_example.items()}
        name = f"test_log_px.{len(data['evals']) - 1}.pt"
        data["evals"][-1]["per_example"] = name
        _write_text(run_dir / METRICS, json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n")
        atomic_save(tensors, run_dir / name)
        atomic_save(tensors, run_dir / PER_EXAMPLE)
    return data


def remove_unstarted(run_dir: Path) -> None:
    """Remove a run directory that this command created and that holds no training yet (no
    checkpoint, no metrics): only vaexp's and Hydra's own records are deleted."""
    import shutil

    run_dir = Path(run_dir)
    if (run_dir / "checkpoint.pt").exists() or (run_dir / METRICS).exists():
        return
    for entry in run_dir.iterdir():
        if entry.name == ".hydra" and entry.is_dir():
            shutil.rmtree(entry)
        elif entry.name in (CONFIG, "train.log") or entry.name.startswith("events.out.tfevents"):
            entry.unlink()
    if not any(run_dir.iterdir()):
        run_dir.rmdir()


def _json_safe(value):
    """Plain JSON: NaN/inf (e.g. no validation set) become null, tensors and numpy scalars floats."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    value = float(value)
    return value if math.isfinite(value) else None


def hparams(cfg) -> Dict:
    return {"dataset": cfg.dataset.name, "model": cfg.model.name, "objective": cfg.objective.name,
            "estimator": cfg.estimator.name, "m": cfg.m, "k": cfg.k, "beta": cfg.beta, "seed": cfg.seed,
            "schedule": cfg.schedule.name, "lr": cfg.schedule.lr, "batch_size": cfg.batch_size}


def logger(run_dir: Path, purge_step: Optional[int] = None):
    from vaexp.tblog import RunLogger

    return RunLogger(run_dir, purge_step=purge_step)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
