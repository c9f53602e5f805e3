"""`vaexp report <dir>...`: every run under the given directories as tables and plots.

A run is a directory holding the config.yaml that `vaexp train` writes (found at any depth;
hidden folders skipped). It is finished when metrics.json says so (vaexp.rundir.judge: its last
evaluation is of its last checkpoint, at the configured length); it is then reported by that
evaluation, with the eval settings stored with it (not config.yaml's). Other runs are listed
with their state (diverged, the last checkpoint's epoch, the error a sweep job recorded). Writes
report.md (also to stdout), runs.csv (one row per run), summary.csv (one row per setting: mean,
std, n over seeds) and PNG plots (NLL vs M per M·K line, (M, K) heatmaps, training curves).
Invariants: runs are grouped by every setting except vaexp.rundir.NOT_A_SETTING, so seeds of one
setting share a row; two finished runs of one setting and seed (a copied directory) count once,
and the report says so; runs are plotted together only when they agree on everything but
objective, estimator, β, M, K and seed. Reading finished runs needs no torch.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import yaml
from omegaconf import OmegaConf

from vaexp.errors import VaexpError
from vaexp.rundir import (CHECKPOINT, CONFIG, ERROR_FILE, METRICS, NOT_A_SETTING, configured_epochs, covers, flatten,
                          judge, quantity_key, read_metrics)
from vaexp.schedule import epoch_learning_rates

# Settings that do not change what a run computes (or are aggregated: seed): runs are grouped
# into settings and contexts without them (vaexp.rundir holds the list).
IGNORED = tuple(NOT_A_SETTING)
# What varies inside one plot: the lines, and the (M, K) axes.
LINE_KEYS = ("objective.name", "estimator.name", "beta")
GRID_KEYS = ("m", "k")
# Columns every table has (config keys); anything else that varies gets a column of its own.
STANDARD_KEYS = ("dataset.name", "model.name", "objective.name", "estimator.name", "m", "k", "beta", "seed",
                 "eval.k", "eval.n_test")
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

    @property
    def setting(self) -> Tuple:
        return _key(self.flat, IGNORED)

    @property
    def context(self) -> Tuple:
        return _key(self.flat, IGNORED + LINE_KEYS + GRID_KEYS)


# --------------------------------------------------------------------------- finding runs

def check_dirs(dirs: Sequence[str]) -> None:
    if not dirs:
        raise ReportError("vaexp report needs at least one directory: vaexp report outputs/multirun/<sweep> "
                          "[more sweep or run directories]")
    for d in dirs:
        if not Path(str(d)).is_dir():
            raise ReportError(f"{d}: no such directory; pass sweep or run directories made by vaexp train, "
                              f"e.g. vaexp report outputs/multirun/<sweep>")


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
                skipped.append((here, f"unreadable config.yaml ({_one_line(e)})"))
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
                run.train = metrics.get("train") if isinstance(metrics.get("train"), dict) else {}
                run.flat = _with_eval_settings(run.flat, last)
            elif ERROR_FILE in files:
                run.status = "failed"
                lines = [ln for ln in (here / ERROR_FILE).read_text(errors="replace").splitlines() if ln.strip()]
                run.detail = lines[0] if lines else "failed"
            else:
                run.status = state
                run.detail = detail if metrics is not None else ""
            if run.status != "finished":
                state = _checkpoint_state(here, cfg)
                run.detail = f"{run.detail}; {state}" if run.detail else state
            runs.append(run)
    return runs, skipped


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


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


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


def _config_columns(run: Run) -> Dict[str, Any]:
    f = run.flat
    return {"dataset": f.get("dataset.name"), "model": f.get("model.name"),
            "latents": _fmt_list(f.get("model.latents")), "objective": f.get("objective.name"),
            "estimator": f.get("estimator.name"), "m": f.get("m"), "k": f.get("k"),
            "mk": (f["m"] * f["k"]) if isinstance(f.get("m"), int) and isinstance(f.get("k"), int) else None,
            "beta": run.config.get("beta"), "seed": f.get("seed"),
            "eval_k": run.test.get("k", f.get("eval.k")), "n_test": run.test.get("n_test", f.get("eval.n_test"))}


def _fmt_list(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ";".join(_fmt_num(x) for x in v)
    return "" if v is None else str(v)


def _fmt_num(v: Any) -> str:
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


def _sort_key(run: Run) -> Tuple:
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


# --------------------------------------------------------------------------- formatting

def _fmt(mean: Optional[float], std: Optional[float], digits: int = 2) -> str:
    if mean is None:
        return "–"
    if std is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _fmt_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "–"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {s:02d}s"
    hours, m = divmod(minutes, 60)
    return f"{hours}h {m:02d}m"


def _fmt_units(group: Group) -> str:
    stats = group.unit_stats()
    if stats is None:
        return "–"
    mean, units = stats
    return ", ".join(f"{_fmt_num(round(a, 1))}/{_fmt_num(u)}" for a, u in zip(mean, units))


def _md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|")


def markdown(groups: Sequence[Group], unfinished: Sequence[Run], skipped: Sequence[Tuple[Path, str]],
             extra_keys: Sequence[str], common: Dict[str, Any],
             duplicates: Sequence[Tuple[Run, Run]] = ()) -> str:
    finished_groups = [g for g in groups]
    l_keys = sorted({k for g in finished_groups for r in g.runs for k in metric_values(r)
                     if k.startswith("L") and k[1:].isdigit()}, key=lambda s: int(s[1:]))
    surgery = [(key, title) for key, title in SURGERY[1:]
               if any(key in r.test for g in finished_groups for r in g.runs)]
    jvi = any("train_jvi_estimate" in metric_values(r) for g in finished_groups for r in g.runs)
    hoisted = [k for k in ("dataset.name", "model.name", "estimator.name") if k in common]
    header = [("dataset", "dataset.name"), ("model", "model.name"), ("objective", "objective.name"),
              ("estimator", "estimator.name")]
    header = [(title, key) for title, key in header if key not in hoisted]
    cols = [t for t, _ in header] + ["M", "K", "β", "seeds", "test NLL"] + l_keys + ["active units"] \
        + [t for _, t in surgery] + ["train bound"] + (["train JVI estimate"] if jvi else []) + ["wall time"] \
        + [_short(k) for k in extra_keys]
    lines = []
    if common:
        desc = ", ".join(f"{_short(k)}={_fmt_value(v)}" for k, v in common.items())
        lines.append(f"All runs: {desc}.")
        lines.append("")
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---" if c in ("dataset", "model", "objective", "estimator") else "--:"
                                for c in cols) + "|")
    for g in finished_groups:
        f = g.first.flat
        seeds = sorted({str(r.flat.get("seed")) for r in g.runs})
        row = [_md_escape(f.get(key)) for _, key in header]
        beta = g.first.config.get("beta") if f.get("objective.name") == "ciwae" else None
        row += [str(f.get("m")), str(f.get("k")), "–" if beta is None else _fmt_num(beta),
                seeds[0] if len(g.runs) == 1 else f"{len(g.runs)} ({','.join(seeds)})"]
        row.append(_fmt(*g.stats("test_nll")[:2]))
        for key in l_keys:
            row.append(_fmt(*g.stats(key)[:2]))
        row.append(_fmt_units(g))
        for key, _ in surgery:
            row.append(_fmt(*g.stats(key)[:2]))
        row.append(_fmt(*g.stats("train_bound")[:2]))
        if jvi:
            row.append(_fmt(*g.stats("train_jvi_estimate")[:2]))
        row.append(_fmt_time(g.stats("wall_time_s")[0]))
        row += [_md_escape(_fmt_value(f.get(k))) for k in extra_keys]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    ks = sorted({str(r.test.get("k")) for g in finished_groups for r in g.runs})
    lines.append(f"Test NLL: −log p(x) estimated with K = {', '.join(ks)} importance samples; "
                 "a ± is the standard deviation over the seeds of a row (n − 1 in the denominator); "
                 "rows of one run show its value. Wall time: training, mean over seeds.")
    if unfinished:
        lines.append("")
        lines.append(f"Not finished ({len(unfinished)}):")
        for r in unfinished:
            lines.append(f"- `{r.name}`: {r.status}: {r.detail}" if r.status in ("failed", "diverged")
                         else f"- `{r.name}`: {r.detail}")
    if duplicates:
        lines.append("")
        lines.append(f"Duplicates ({len(duplicates)}), counted once:")
        for dup, orig in duplicates:
            same = dup.test.get("nll") == orig.test.get("nll")
            nlls = "the same test NLL" if same else f"test NLL {_fmt_num(dup.test.get('nll'))} vs " \
                                                    f"{_fmt_num(orig.test.get('nll'))}"
            lines.append(f"- `{dup.name}`: same settings and seed as `{orig.name}` ({nlls})")
    if skipped:
        lines.append("")
        lines.append(f"Skipped ({len(skipped)}):")
        for path, why in skipped:
            lines.append(f"- `{path}`: {why}")
    return "\n".join(lines) + "\n"


def _short(key: str) -> str:
    return key[:-5] if key.endswith(".name") else key


def _fmt_value(v: Any) -> str:
    if isinstance(v, tuple):
        return "[" + ",".join(_fmt_num(x) for x in v) + "]"
    if isinstance(v, float):
        return _fmt_num(v)
    return str(v)


RUN_COLUMNS = ["run", "status", "dataset", "model", "latents", "objective", "estimator", "m", "k", "mk", "beta",
               "seed", "epochs", "test_nll", "test_nll_stderr", "eval_k", "n_test"]


def runs_csv(runs: Sequence[Run], extra_keys: Sequence[str]) -> str:
    l_keys = sorted({k for r in runs for k in metric_values(r) if k.startswith("L") and k[1:].isdigit()}
                    if runs else [], key=lambda s: int(s[1:]))
    surgery = [key for key, _ in SURGERY if any(key in r.test for r in runs)]
    cols = RUN_COLUMNS + l_keys + ["active_units", "latent_units"] + surgery + \
        ["train_bound", "valid_bound"] + _jvi_columns(runs) + ["wall_time_s", "device"] + list(extra_keys) \
        + ["detail", "path"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in runs:
        values = {**_config_columns(r), "run": r.name, "status": r.status, "detail": r.detail, "path": str(r.path)}
        if r.status in ("finished", "duplicate"):
            mv = metric_values(r)
            values.update({k: v for k, v in mv.items() if k != "active_units"})
            values["active_units"] = _fmt_list(mv.get("active_units"))
            values["latent_units"] = _fmt_list(r.test.get("latent_units"))
            values["device"] = r.train.get("device", "")
        for key in extra_keys:
            values[key] = _fmt_value(r.flat.get(key))
        w.writerow([_fmt_num(values.get(c)) if not isinstance(values.get(c), str) else values.get(c) for c in cols])
    return buf.getvalue()


def _jvi_columns(runs: Sequence[Run]) -> List[str]:
    """objective=jvi trains on the JVI estimate, not a bound: its own columns, when there are such runs."""
    has = any("train_jvi_estimate" in metric_values(r) for r in runs if r.status == "finished")
    return ["train_jvi_estimate", "valid_jvi_estimate"] if has else []


def summary_csv(groups: Sequence[Group], extra_keys: Sequence[str]) -> str:
    metrics = ["test_nll"] + sorted({k for g in groups for r in g.runs for k in metric_values(r)
                                     if k.startswith("L") and k[1:].isdigit()}, key=lambda s: int(s[1:]))
    metrics += [key for key, _ in SURGERY if any(key in r.test for g in groups for r in g.runs)]
    metrics += ["train_bound", "valid_bound"] + _jvi_columns([r for g in groups for r in g.runs]) + ["wall_time_s"]
    cols = ["dataset", "model", "latents", "objective", "estimator", "m", "k", "mk", "beta", "eval_k", "n_test",
            "n_seeds", "seeds"] + [f"{m}_{s}" for m in metrics for s in ("mean", "std")] + \
        ["active_units_mean", "latent_units"] + list(extra_keys)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for g in groups:
        values = _config_columns(g.first)
        values.pop("seed")
        values["n_seeds"] = len(g.runs)
        values["seeds"] = ";".join(sorted(str(r.flat.get("seed")) for r in g.runs))
        for m in metrics:
            mean, std, _ = g.stats(m)
            values[f"{m}_mean"], values[f"{m}_std"] = mean, std
        units = g.unit_stats()
        if units is not None:
            values["active_units_mean"] = ";".join(_fmt_num(a) for a in units[0])
            values["latent_units"] = ";".join(_fmt_num(u) for u in units[1])
        for key in extra_keys:
            values[key] = _fmt_value(g.first.flat.get(key))
        w.writerow([values.get(c) if isinstance(values.get(c), str) else _fmt_num(values.get(c)) for c in cols])
    return buf.getvalue()


# --------------------------------------------------------------------------- plots

def _contexts(groups: Sequence[Group]) -> List[Tuple[str, str, List[Group]]]:
    """(title, file suffix, groups) per context: groups whose settings agree apart from the line
    and grid keys. With one context the suffix is empty."""
    by: Dict[Tuple, List[Group]] = {}
    for g in groups:
        by.setdefault(g.first.context, []).append(g)
    firsts = [gs[0].first for gs in by.values()]
    differing = varying_keys(firsts, IGNORED + LINE_KEYS + GRID_KEYS)
    out = []
    for i, gs in enumerate(by.values()):
        f = gs[0].first.flat
        shown = ["dataset.name", "model.name"] + [k for k in differing if k not in ("dataset.name", "model.name")]
        title = ", ".join(_fmt_value(f.get(k)) if k.endswith(".name") else f"{_short(k)}={_fmt_value(f.get(k))}"
                          for k in shown)
        if len(by) == 1:
            suffix = ""
        else:
            parts = "_".join(f"{_short(k)}-{_fmt_value(f.get(k))}" for k in differing)
            suffix = "_" + (re.sub(r"[^A-Za-z0-9.=+-]+", "_", parts)[:60].strip("_") or f"ctx{i + 1}")
            suffix += f"_{i + 1}" if any(s == suffix for _, s, _ in out) else ""
        out.append((title, suffix, gs))
    return out


def _line_key(run: Run) -> Tuple[str, str, Optional[float]]:
    f = run.flat
    return (str(f.get("objective.name")), str(f.get("estimator.name")),
            run.config.get("beta") if f.get("objective.name") == "ciwae" else None)


def _line_label(key: Tuple[str, str, Optional[float]]) -> str:
    obj, est, beta = key
    return f"{obj} β={_fmt_num(beta)} ({est})" if beta is not None else f"{obj} ({est})"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_nll_vs_m(groups: Sequence[Group], title: str, out: Path, suffix: str = "") -> List[Path]:
    """One PNG per M·K product that has at least two M values in this context."""
    by_product: Dict[int, List[Group]] = {}
    for g in groups:
        m, k = g.first.flat.get("m"), g.first.flat.get("k")
        if isinstance(m, int) and isinstance(k, int):
            by_product.setdefault(m * k, []).append(g)
    written = []
    for product, gs in sorted(by_product.items()):
        if len({g.first.flat["m"] for g in gs}) < 2:
            continue
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        lines: Dict[Tuple, List[Group]] = {}
        for g in gs:
            lines.setdefault(_line_key(g.first), []).append(g)
        for key, lgs in sorted(lines.items(), key=lambda kv: _line_label(kv[0])):
            lgs = sorted(lgs, key=lambda g: g.first.flat["m"])
            xs = [g.first.flat["m"] for g in lgs]
            st = [g.stats("test_nll") for g in lgs]
            ys = [s[0] for s in st]
            errs = [s[1] or 0.0 for s in st]
            ax.errorbar(xs, ys, yerr=errs if any(errs) else None, marker="o", capsize=3, label=_line_label(key))
        ax.set_xscale("log", base=2)
        ms = sorted({g.first.flat["m"] for g in gs})
        ax.set_xticks(ms)
        ax.set_xticklabels([str(m) for m in ms])
        ax.set_xlabel(f"M (K = {product}/M)")
        ax.set_ylabel("test NLL (nats, lower is better)")
        ax.set_title(f"test NLL along M·K = {product}\n{title}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out / f"nll_vs_m_mk{product}{suffix}.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def plot_heatmaps(groups: Sequence[Group], title: str, out: Path, suffix: str) -> List[Path]:
    lines: Dict[Tuple, List[Group]] = {}
    for g in groups:
        if isinstance(g.first.flat.get("m"), int) and isinstance(g.first.flat.get("k"), int):
            lines.setdefault(_line_key(g.first), []).append(g)
    written = []
    for key, gs in sorted(lines.items(), key=lambda kv: _line_label(kv[0])):
        ms = sorted({g.first.flat["m"] for g in gs})
        ks = sorted({g.first.flat["k"] for g in gs})
        products = {g.first.flat["m"] * g.first.flat["k"] for g in gs}
        if len(ms) < 2 or len(ks) < 2 or len(products) < 2:
            continue
        import numpy as np

        grid = np.full((len(ms), len(ks)), np.nan)
        for g in gs:
            grid[ms.index(g.first.flat["m"]), ks.index(g.first.flat["k"])] = g.stats("test_nll")[0]
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(1.1 * len(ks) + 2.6, 0.8 * len(ms) + 2.0))
        masked = np.ma.masked_invalid(grid)
        im = ax.imshow(masked, cmap="viridis_r", aspect="auto", origin="lower")
        ax.set_xticks(range(len(ks)))
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_yticks(range(len(ms)))
        ax.set_yticklabels([str(m) for m in ms])
        ax.set_xlabel("K (samples inside the log)")
        ax.set_ylabel("M (samples outside the log)")
        finite = grid[np.isfinite(grid)]
        mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
        for i in range(len(ms)):
            for j in range(len(ks)):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if grid[i, j] > mid else "black")
        fig.colorbar(im, ax=ax, label="test NLL")
        ax.set_title(f"test NLL, {_line_label(key)}\n{title}", fontsize=9)
        fig.tight_layout()
        obj, est, beta = key
        name = f"heatmap_{obj}_{est}" + (f"_beta{_fmt_num(beta)}" if beta is not None else "") + f"{suffix}.png"
        written.append(out / name)
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def read_curves(run_dir: Path, tags: Sequence[str] = ("epoch/train_bound", "epoch/valid_bound",
                                                     "epoch/train_jvi_estimate", "epoch/valid_jvi_estimate")
                ) -> Dict[str, List[Tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the run's TensorBoard event files ({} when there are none)."""
    if not any(p.name.startswith("events.out.tfevents") for p in run_dir.iterdir()):
        return {}
    import logging

    from tensorboard.backend.event_processing import event_accumulator as ea

    logging.getLogger("tensorboard").setLevel(logging.ERROR)  # "No path found after ..." per run

    acc = ea.EventAccumulator(str(run_dir), size_guidance={ea.SCALARS: 0, ea.IMAGES: 1, ea.TENSORS: 1,
                                                           ea.HISTOGRAMS: 1, ea.AUDIO: 1,
                                                           ea.COMPRESSED_HISTOGRAMS: 1})
    try:
        acc.Reload()
    except Exception:
        return {}
    available = set(acc.Tags().get("scalars", []))
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in tags if tag in available}


def plot_curves(runs: Sequence[Run], title: str, out: Path, suffix: str) -> List[Path]:
    curves = [(r, read_curves(r.path)) for r in runs]
    curves = [(r, c) for r, c in curves if c]
    if not curves:
        return []
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    labels: Dict[Tuple, Any] = {}
    cmap = plt.get_cmap("tab20" if len(curves) > 10 else "tab10")
    for r, c in sorted(curves, key=lambda rc: _sort_key(rc[0])):
        f = r.flat
        key = (_line_key(r), f.get("m"), f.get("k"))
        first = key not in labels
        if first:
            labels[key] = cmap(len(labels) % cmap.N)
        label = f"{_line_label(key[0])} M={key[1]} K={key[2]}" + ("" if r.status == "finished" else " (running)")
        q = "jvi_estimate" if "epoch/train_jvi_estimate" in c else "bound"  # jvi: the JVI estimate, dashed
        for ax, tag in zip(axes, (f"epoch/train_{q}", f"epoch/valid_{q}")):
            if tag in c:
                steps, values = zip(*c[tag])
                ax.plot(steps, values, color=labels[key], lw=1.2, label=label if first else None,
                        linestyle="--" if q != "bound" else "-")
    jvi = any("epoch/train_jvi_estimate" in c for _, c in curves)
    names = ("training bound (epoch mean)", "validation bound")
    if jvi:
        names = tuple(n + "; dashed: JVI estimate" for n in names)
    for ax, name in zip(axes, names):
        ax.set_xlabel("step")
        ax.set_title(name, fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("bound (nats per image, higher is better)")
    handles, lab = axes[0].get_legend_handles_labels()
    fig.subplots_adjust(left=0.07, right=0.72 if handles else 0.97, wspace=0.25, top=0.86)
    if handles:
        fig.legend(handles, lab, loc="center left", bbox_to_anchor=(0.735, 0.5), fontsize=7, frameon=False)
    fig.suptitle(f"training curves: {title}", fontsize=10)
    written = out / f"curves{suffix}.png"
    fig.savefig(written, dpi=110)
    plt.close(fig)
    return [written]


# --------------------------------------------------------------------------- the command

def report(dirs: Sequence[str], out: Optional[str] = None, plots: bool = True, curves: bool = True,
           stream=None) -> Dict[str, Any]:
    """Find, tabulate and plot; returns what was written. Raises ReportError when nothing can be
    reported (no runs, or none finished); nothing is written then."""
    stream = stream or sys.stdout
    check_dirs(dirs)
    runs, skipped = find_runs(dirs)
    where = ", ".join(str(d) for d in dirs)
    for path, why in skipped:
        print(f"vaexp: warning: skipped {path}: {why}", file=sys.stderr)
    finished = sorted([r for r in runs if r.status == "finished"], key=_sort_key)
    unfinished = sorted([r for r in runs if r.status != "finished"], key=lambda r: r.name)
    if not runs and not skipped:
        raise ReportError(f"no vaexp runs under {where} (no config.yaml written by vaexp train); pass sweep or "
                          f"run directories, e.g. vaexp report outputs/multirun/<sweep>")
    if not finished:
        parts = [f"{len(unfinished)} not finished"] if unfinished else []
        failed = [r for r in unfinished if r.status == "failed"]
        if failed:
            parts.append(f"{len(failed)} of them failed, e.g. {failed[0].name}: {failed[0].detail}")
        if skipped:
            parts.append(f"{len(skipped)} skipped (unreadable metrics.json or config.yaml)")
        raise ReportError(f"nothing to report under {where}: no run has finished ({'; '.join(parts)}); "
                          f"run vaexp report again when runs have finished")

    finished, duplicates = split_duplicates(finished)
    finished = sorted(finished, key=_sort_key)
    for dup, orig in duplicates:
        dup.status, dup.detail = "duplicate", f"same settings and seed as {orig.name}; counted once"
    groups = group_runs(finished)
    groups.sort(key=lambda g: _sort_key(g.first))
    extra = varying_keys(finished, IGNORED + STANDARD_KEYS)
    extra = [k for k in extra if not k.startswith("eval.")] + [k for k in extra if k.startswith("eval.")]
    common = {}
    for key in ("dataset.name", "model.name", "estimator.name"):
        values = {repr(r.flat.get(key)) for r in finished}
        if len(values) == 1:
            common[key] = finished[0].flat.get(key)
    md = markdown(groups, unfinished, skipped, extra, common, duplicates)

    out_dir = Path(str(out)) if out else Path(str(dirs[0])) / "report"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"out={out_dir}: cannot create it ({_one_line(e)}); pass a writable out=<dir>") from None
    written = []
    for name, text in (("report.md", md), ("runs.csv", runs_csv(finished + [d for d, _ in duplicates] + unfinished,
                                                                extra)),
                       ("summary.csv", summary_csv(groups, extra))):
        (out_dir / name).write_text(text)
        written.append(out_dir / name)

    notes = []
    contexts = _contexts(groups)
    if len(contexts) > 1:
        keys = varying_keys([gs[0].first for _, _, gs in contexts], IGNORED + LINE_KEYS + GRID_KEYS)
        notes.append(f"the runs differ in {', '.join(_short(k) for k in keys)}: their NLLs are not comparable in "
                     f"one plot, so each combination gets its own plots ({len(contexts)} sets)")
    plotted: List[Path] = []
    if plots:
        for title, suffix, gs in contexts:
            sub = plot_nll_vs_m(gs, title, out_dir, suffix)
            sub += plot_heatmaps(gs, title, out_dir, suffix)
            if curves:
                members = [r for g in gs for r in g.runs]
                ctx = gs[0].first.context
                members += [r for r in unfinished if r.context == ctx]
                sub += plot_curves(members, title, out_dir, suffix)
            plotted += sub
    stream.write(md)
    stream.flush()
    for note in notes:
        print(f"vaexp: note: {note}", file=sys.stderr)
    files = ", ".join(p.name for p in written + plotted)
    print(f"vaexp: {len(finished)} finished run(s) in {len(groups)} setting(s)"
          + (f", {len(duplicates)} duplicate(s) counted once" if duplicates else "")
          + (f", {len(unfinished)} not finished" if unfinished else "")
          + (f", {len(skipped)} skipped" if skipped else "") + f"; written to {out_dir}: {files}", file=sys.stderr)
    return {"out": out_dir, "files": written + plotted, "runs": runs, "groups": groups, "skipped": skipped,
            "markdown": md}
