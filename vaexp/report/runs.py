"""The runs a report is about: found under directories, judged, grouped into settings.

A run is a directory holding the config.yaml that `vaexp train` writes (found at any depth; hidden
folders skipped). Invariants: whether it is finished is vaexp.rundir.judge's verdict on its
metrics.json (never config.yaml alone); a finished run's eval settings are those its latest
evaluation stored; runs are grouped by every setting except vaexp.rundir.NOT_A_SETTING, so seeds
of one setting share a group; a copied run (same setting and seed) counts once.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import yaml
from omegaconf import OmegaConf

from vaexp.errors import VaexpError, one_line
from vaexp.rundir import (CHECKPOINT, CONFIG, ERROR_FILE, METRICS, NOT_A_SETTING, WEIGHT_KEYS, configured_epochs,
                          covers, flatten, judge, quantity_key, read_metrics)
from vaexp.schedule import epoch_learning_rates

# into settings and contexts without them (vaexp.rundir holds the list).
IGNORED = tuple(NOT_A_SETTING)
# What varies inside one plot: the lines, and the (M, K) axes.
LINE_KEYS = ("objective.name", "estimator.name", "beta")
GRID_KEYS = ("m", "k")
# Columns every table has (config keys); anything else that varies gets a column of its own.
# eval.k and eval.n_test (as evaluated) are not among them: when they differ, they get columns.
STANDARD_KEYS = ("dataset.name", "model.name", "objective.name", "estimator.name", "m", "k", "beta", "seed")
SURGERY = (("recon", "recon"), ("avg_kl", "avg KL"), ("mutual_info", "I(x;z)"),
           ("marginal_kl", "KL(q(z)‖p(z))"))


class ReportError(VaexpError):
    pass


@dataclass
class Run:
    path: Path
    name: str                      # as shown: relative to the directory it was found under
    config: Dict[str, Any]
    flat: Dict[str, Any]           # dotted keys, lists as tuples
    status: str                    # finished | unfinished | diverged | failed | duplicate
    test: Dict[str, Any] = field(default_factory=dict)
    train: Dict[str, Any] = field(default_factory=dict)
    detail: str = ""
    evaluation: Dict[str, Any] = field(default_factory=dict)  # the latest metrics.json "evals" entry
    hint: str = ""                 # an unfinished run: the command that finishes it
    curve: List[Dict[str, Any]] = field(default_factory=list)  # evaluations during training (eval.every)

    @property
    def setting(self) -> Tuple:
        return _key(self.flat, IGNORED)

    @property
    def context(self) -> Tuple:
        return _key(self.flat, IGNORED + LINE_KEYS + GRID_KEYS)

    @property
    def training_context(self) -> Tuple:
        """context without the eval.* settings, which a training curve does not depend on (and
        which an unfinished run has only as configured: n_test=null, not the evaluated count)."""
        return _key(self.flat, IGNORED + LINE_KEYS + GRID_KEYS + ("eval",))


# --------------------------------------------------------------------------- finding runs

def check_dirs(dirs: Sequence[str], command: str = "report") -> None:
    if not dirs:
        raise ReportError(f"vaexp {command} needs at least one directory: vaexp {command} outputs/multirun/<sweep> "
                          f"[more sweep or run directories]")
    for d in dirs:
        if not Path(str(d)).is_dir():
            raise ReportError(f"{d}: no such directory; pass sweep or run directories made by vaexp train, "
                              f"e.g. vaexp {command} outputs/multirun/<sweep>")


def _key(flat: Dict[str, Any], drop: Iterable[str]) -> Tuple:
    drop = tuple(drop)
    return tuple(sorted((k, repr(v)) for k, v in flat.items() if not covers(drop, k)))


def _is_run_config(cfg: Any) -> bool:
    """A `vaexp train` config (not, e.g., a `vaexp snr` one, whose k and m are lists)."""
    return (isinstance(cfg, dict)
            and all(isinstance(cfg.get(k), dict) for k in ("dataset", "model", "objective", "estimator", "schedule"))
            and isinstance(cfg.get("k"), int) and isinstance(cfg.get("m"), int))


def _load_yaml(path: Path) -> Any:
    with open(path) as f:
        return yaml.safe_load(f)


def _normalised_flat(cfg: Dict[str, Any]) -> Dict[str, Any]:
    flat = {k: tuple(v) if isinstance(v, list) else v for k, v in flatten(cfg).items()}
    if flat.get("objective.name") != "ciwae":
        flat["beta"] = None  # beta only weighs ciwae's VAE term: elsewhere it changes nothing
    return flat


def _checkpoint_state(run_dir: Path, cfg: Dict[str, Any]) -> str:
    path = run_dir / CHECKPOINT
    if not path.exists():
        return "no checkpoint yet"
    total = ""
    try:
        total = f"/{len(epoch_learning_rates(OmegaConf.create(cfg['schedule'])))}"
    except Exception:
        pass
    try:
        import torch  # only for unfinished runs: a report of finished runs never loads torch

        state = torch.load(path, map_location="cpu", weights_only=False)["state"]
        return f"checkpoint at epoch {state['epoch']}{total}, step {state['global_step']}"
    except Exception as e:  # a checkpoint being written or damaged must not stop the report
        return f"checkpoint unreadable ({type(e).__name__})"


def find_runs(dirs: Sequence[str]) -> Tuple[List[Run], List[Tuple[Path, str]]]:
    """(runs, skipped) under the given directories; skipped: (dir, reason) of run directories
    that cannot be reported (unreadable config.yaml or metrics.json)."""
    runs: List[Run] = []
    skipped: List[Tuple[Path, str]] = []
    seen = set()
    for top in dirs:
        top_path = Path(str(top))
        for root, subdirs, files in os.walk(top_path):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            here = Path(root)
            if CONFIG not in files:
                if METRICS in files:
                    skipped.append((here, "metrics.json without config.yaml"))
                continue
            try:
                cfg = _load_yaml(here / CONFIG)
            except Exception as e:
                skipped.append((here, f"unreadable config.yaml ({one_line(e)})"))
                subdirs[:] = []
                continue
            if not _is_run_config(cfg):
                continue  # some other tool's config.yaml: keep looking below
            subdirs[:] = []  # a run directory holds no runs
            real = here.resolve()
            if real in seen:
                continue
            seen.add(real)
            rel = here.relative_to(top_path)
            name = str(rel) if str(rel) != "." else here.name
            if len(dirs) > 1:
                name = f"{top_path.name}/{name}" if str(rel) != "." else here.name
            run = Run(path=here, name=name, config=cfg, flat=_normalised_flat(cfg), status="unfinished")
            metrics, why = read_metrics(here) if METRICS in files else (None, None)
            if why is not None:
                skipped.append((here, f"unreadable metrics.json ({why})"))
                continue
            state, detail = judge(metrics, configured_epochs(cfg))
            if state == "finished":
                last = metrics["evals"][-1]
                run.status, run.test = "finished", {k: v for k, v in last.items() if k not in _EVAL_RECORD}
                run.evaluation = last
                run.train = metrics.get("train") if isinstance(metrics.get("train"), dict) else {}
                run.curve = [p for p in metrics.get("curve") or [] if isinstance(p, dict) and "epoch" in p]
                run.flat = _with_eval_settings(run.flat, last)
            elif ERROR_FILE in files and state != "diverged":  # a diverged sweep job writes error.txt too
                run.status = "failed"
                lines = [ln for ln in (here / ERROR_FILE).read_text(errors="replace").splitlines() if ln.strip()]
                run.detail = lines[0] if lines else "failed"
            else:
                run.status = state
                run.detail = detail if metrics is not None else ""
            if run.status != "finished":
                state = _checkpoint_state(here, cfg)
                run.detail = f"{run.detail}; {state}" if run.detail else state
                run.hint = _hint(run, metrics)
            runs.append(run)
    return runs, skipped


def _hint(run: Run, metrics: Optional[Dict[str, Any]]) -> str:
    """What to run to finish an unfinished run."""
    state = ((metrics or {}).get("run") or {}).get("state")
    if run.status == "diverged":
        return "lower schedule.lr and train it again (a new run)"
    if run.status == "failed":
        return "fix the error, then run its sweep's command again (same sweep=<name>)"
    if state == "trained":  # training complete, the evaluation missing or not of the last checkpoint
        return f"vaexp eval {run.path}"
    if (run.path / CHECKPOINT).exists():
        return f"vaexp train resume={run.path}"
    return "not started: run its command (or its sweep's) again"


# Keys of a metrics.json evaluation entry that are not metrics.
_EVAL_RECORD = ("time", "settings", "checkpoint", "by", "per_example")


def _with_eval_settings(flat: Dict[str, Any], entry: Dict[str, Any]) -> Dict[str, Any]:
    """The run's settings with eval.* replaced by those its evaluation used (k and n_test as
    evaluated: n_test=null and the test set's size are the same evaluation)."""
    out = {k: v for k, v in flat.items() if not k.startswith("eval.")}
    settings = entry.get("settings") if isinstance(entry.get("settings"), dict) else {}
    for key, value in settings.items():
        out[f"eval.{key}"] = tuple(value) if isinstance(value, list) else value
    out["eval.k"], out["eval.n_test"] = entry.get("k", out.get("eval.k")), entry.get("n_test", out.get("eval.n_test"))
    return out


def split_duplicates(runs: Sequence[Run]) -> Tuple[List[Run], List[Tuple[Run, Run]]]:
    """(runs counted, [(duplicate, the run it repeats)]): finished runs of one setting and seed
    (e.g. a copied run directory) count once."""
    first: Dict[Tuple, Run] = {}
    kept, duplicates = [], []
    for r in sorted(runs, key=lambda r: (str(r.path), r.name)):
        key = (r.setting, repr(r.flat.get("seed")))
        if key in first:
            duplicates.append((r, first[key]))
        else:
            first[key] = r
            kept.append(r)
    return kept, duplicates


# --------------------------------------------------------------------------- rows and groups

def _num(x: Any) -> Optional[float]:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def _units(values: Any) -> Optional[Tuple[float, ...]]:
    if isinstance(values, (list, tuple)) and values and all(_num(v) is not None for v in values):
        return tuple(float(v) for v in values)
    return None


def metric_values(run: Run) -> Dict[str, Any]:
    """The numbers of a finished run, by CSV column name."""
    t, tr = run.test, run.train
    out: Dict[str, Any] = {"test_nll": _num(t.get("nll")), "test_nll_stderr": _num(t.get("nll_stderr"))}
    eval_k = t.get("k")
    for key, value in t.items():
        if key.startswith("L") and key[1:].isdigit() and str(eval_k) != key[1:]:
            out[key] = _num(value)
    if t.get("L64") is not None and t.get("nll") is not None and eval_k != 64:
        # Rainforth et al.'s −KL(Q‖P) column: the IWAE-64 bound minus log p̂ (both from the same samples).
        out["neg_kl_qp"] = _num(t["L64"] + t["nll"])
    for key in WEIGHT_KEYS:  # importance-weight diagnostics of the K-sample estimate
        if key in t:
            out[key] = _num(t[key])
    out["active_units"] = _units(t.get("active_units"))
    for key, _ in SURGERY:
        if key in t:
            out[key] = _num(t.get(key))
    q = quantity_key(tr.get("quantity", "bound"))  # "bound", or "jvi_estimate": jvi's is not a bound
    out[f"train_{q}"] = _num(tr.get(q))
    out[f"valid_{q}"] = _num(tr.get(f"valid_{q}"))
    out["epochs"] = _num(tr.get("epochs"))
    out["wall_time_s"] = _num(tr.get("wall_time_s"))
    return out


def fmt_list(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ";".join(fmt_num(x) for x in v)
    return "" if v is None else str(v)


def fmt_num(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v.is_integer() and abs(v) < 1e15:
            return str(int(v))
        return repr(v)
    return str(v)


@dataclass
class Group:
    runs: List[Run]

    @property
    def first(self) -> Run:
        return self.runs[0]

    def stats(self, key: str) -> Tuple[Optional[float], Optional[float], int]:
        """(mean, sample std or None, n) of a scalar metric over the group's runs."""
        values = [metric_values(r).get(key) for r in self.runs]
        values = [v for v in values if v is not None and not math.isnan(v)]
        if not values:
            return None, None, 0
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
        return mean, std, len(values)

    def unit_stats(self) -> Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]:
        """Mean active units per layer, and the latent sizes."""
        au = [metric_values(r)["active_units"] for r in self.runs]
        au = [a for a in au if a is not None]
        if not au or len({len(a) for a in au}) != 1:
            return None
        mean = tuple(sum(a[i] for a in au) / len(au) for i in range(len(au[0])))
        units = _units(self.first.test.get("latent_units")) or tuple(float("nan") for _ in mean)
        return mean, units


def group_runs(runs: Sequence[Run]) -> List[Group]:
    groups: Dict[Tuple, List[Run]] = {}
    for r in runs:
        groups.setdefault(r.setting, []).append(r)
    return [Group(sorted(rs, key=lambda r: (str(r.flat.get("seed")), r.name))) for rs in groups.values()]


def sort_key(run: Run) -> Tuple:
    f = run.flat
    return (repr(run.context), str(f.get("dataset.name")), str(f.get("model.name")), str(f.get("objective.name")),
            str(f.get("estimator.name")), f.get("beta") or 0.0, f.get("m") or 0, f.get("k") or 0)


def varying_keys(runs: Sequence[Run], exclude: Iterable[str]) -> List[str]:
    """Config keys whose values differ between the runs (other than those excluded)."""
    exclude = tuple(exclude)
    keys = sorted(k for k in {k for r in runs for k in r.flat} if not covers(exclude, k))
    out = []
    for key in keys:
        values = {repr(r.flat.get(key)) for r in runs}
        if len(values) > 1:
            out.append(key)
    return out


