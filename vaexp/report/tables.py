"""The report's tables: report.md (markdown, also printed), runs.csv (a row per run) and
summary.csv (a row per setting: mean, std, n over seeds).

Invariant: every number is labelled with what produced it (K and the test images of the stored
evaluation; the seeds of a row); a row of several seeds shows mean ± sample std (n − 1).
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from vaexp.report.runs import (DATA, SURGERY, Group, Run, fmt_list, fmt_num, metric_values, test_images,
                               training_data)
from vaexp.rundir import WEIGHT_KEYS, lk_keys


# The CSVs' own columns of settings: column -> config key. A varying key among them gets no second
# column (the markdown table has no latents column: there model.latents is an extra one).
CSV_SETTINGS = {"dataset": "dataset.name", "model": "model.name", "latents": "model.latents",
                "objective": "objective.name", "estimator": "estimator.name", "m": "m", "k": "k", "beta": "beta",
                "seed": "seed"}


def _config_columns(run: Run) -> Dict[str, Any]:
    f = run.flat
    out = {column: f.get(key) for column, key in CSV_SETTINGS.items()}  # beta: None where it weighs nothing
    out["latents"] = fmt_list(out["latents"])
    out["mk"] = (f["m"] * f["k"]) if isinstance(f.get("m"), int) and isinstance(f.get("k"), int) else None
    out["eval_k"], out["n_test"] = run.test.get("k", f.get("eval.k")), run.test.get("n_test", f.get("eval.n_test"))
    return out


def _csv_extra(extra_keys: Sequence[str]) -> List[str]:
    return [k for k in extra_keys if k not in CSV_SETTINGS.values()]


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
    return ", ".join(f"{fmt_num(round(a, 1))}/{fmt_num(u)}" for a, u in zip(mean, units))


def _md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|")


def _numbers(values) -> List[str]:
    """Distinct values as text, numbers in numeric order (500 before 10000)."""
    return [str(v) for v in sorted(values, key=lambda v: (not isinstance(v, (int, float)), v if isinstance(v, (int, float)) else 0, str(v)))]


def markdown(groups: Sequence[Group], unfinished: Sequence[Run], skipped: Sequence[Tuple[Path, str]],
             extra_keys: Sequence[str], common: Dict[str, Any],
             duplicates: Sequence[Tuple[Run, Run]] = ()) -> str:
    finished_groups = [g for g in groups]
    l_keys = lk_keys(k for g in finished_groups for r in g.runs for k in metric_values(r))
    surgery = [(key, title) for key, title in SURGERY[1:]
               if any(key in r.test for g in finished_groups for r in g.runs)]
    jvi = any("train_jvi_estimate" in metric_values(r) for g in finished_groups for r in g.runs)
    hoisted = [k for k in ("dataset.name", "model.name", "estimator.name") if k in common]
    header = [("dataset", "dataset.name"), ("model", "model.name"), ("objective", "objective.name"),
              ("estimator", "estimator.name")]
    header = [(title, key) for title, key in header if key not in hoisted]
    values = [metric_values(r) for g in finished_groups for r in g.runs]
    neg_kl = any(v.get("neg_kl_qp") is not None for v in values)
    ess = any(v.get("ess_median") is not None for v in values)
    cols = [t for t, _ in header] + ["M", "K", "β", "seeds", "test NLL"] + l_keys + (["−KL(Q‖P)"] if neg_kl else []) \
        + (["ESS median", "ESS < 10"] if ess else []) + ["active units"] \
        + [t for _, t in surgery] + ["train bound"] + (["train JVI estimate"] if jvi else []) + ["wall time"] \
        + [short(k) for k in extra_keys]
    lines = []
    if common:
        desc = ", ".join(f"{short(k)}={fmt_value(v)}" for k, v in common.items())
        lines.append(f"All runs: {desc}.")
        lines.append("")
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---" if c in ("dataset", "model", "objective", "estimator") else "--:"
                                for c in cols) + "|")
    for g in finished_groups:
        f = g.first.flat
        seeds = sorted({str(r.flat.get("seed")) for r in g.runs})
        row = [_md_escape(f.get(key)) for _, key in header]
        beta = f.get("beta")
        row += [str(f.get("m")), str(f.get("k")), "–" if beta is None else fmt_num(beta),
                f"{len(g.runs)} ({','.join(seeds)})"]
        mean, std, n = g.stats("test_nll")
        # a seed whose NLL is not finite (stored as null) is left out of the mean: say so in the cell
        row.append(_fmt(mean, std) + (f" ({n} of {len(g.runs)} seeds finite)" if n < len(g.runs) else ""))
        for key in l_keys:
            row.append(_fmt(*g.stats(key)[:2]))
        if neg_kl:
            row.append(_fmt(*g.stats("neg_kl_qp")[:2]))
        if ess:
            row.append(_fmt(*g.stats("ess_median")[:2], digits=1))
            below = g.stats("ess_below_10")[0]
            row.append("–" if below is None else f"{100 * below:.1f}%")
        row.append(_fmt_units(g))
        for key, _ in surgery:
            row.append(_fmt(*g.stats(key)[:2]))
        row.append(_fmt(*g.stats("train_bound")[:2]))
        if jvi:
            row.append(_fmt(*g.stats("train_jvi_estimate")[:2]))
        row.append(_fmt_time(g.stats("wall_time_s")[0]))
        row += [_md_escape(fmt_value(f.get(k))) for k in extra_keys]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    ks = _numbers({r.test.get("k") for g in finished_groups for r in g.runs})
    ns = _numbers({r.test.get("n_test") for g in finished_groups for r in g.runs})
    lines.append(f"Test NLL: −log p(x) estimated with K = {', '.join(ks)} importance samples on {', '.join(ns)} "
                 "test images (as each run's latest evaluation stored; runs evaluated differently are separate "
                 "rows, with eval.* columns); a ± is the standard deviation over the seeds of a row (n − 1 in the "
                 "denominator); rows of one run show its value. Wall time: training, mean over seeds."
                 + (" −KL(Q‖P) = L_64 − log p̂ (Rainforth et al.'s column: minus the gap between the IWAE-64 bound "
                    "and the K-sample estimate)." if neg_kl else "")
                 + (" ESS: the effective sample size 1/Σw̃² of an image's K normalised importance weights (median "
                    "over images), and the share of images with ESS below 10, whose estimate rests on a handful of "
                    "samples." if ess else "")
                 + (f" {DATA}: the test images each run's evaluation scored (the first hex digits of their "
                    "sha256, with where the run read its data, metrics.json's train.data_source; and the training "
                    "data's sha256 where runs on the same test images trained on other data); runs of one "
                    "setting on other data are separate rows, never seeds of one." if DATA in extra_keys else ""))
    if unfinished:
        lines.append("")
        lines.append(f"Not finished ({len(unfinished)}):")
        for r in unfinished:
            text = f"{r.status}: {r.detail}" if r.status in ("failed", "diverged") else r.detail
            lines.append(f"- `{r.name}`: {text}" + (f" — to finish it: `{r.hint}`" if r.hint else ""))
    if duplicates:
        lines.append("")
        lines.append(f"Duplicates ({len(duplicates)}), counted once:")
        for dup, orig in duplicates:
            same = dup.test.get("nll") == orig.test.get("nll")
            nlls = "the same test NLL" if same else f"test NLL {fmt_num(dup.test.get('nll'))} vs " \
                                                    f"{fmt_num(orig.test.get('nll'))}"
            lines.append(f"- `{dup.name}`: same settings and seed as `{orig.name}` ({nlls})")
    if skipped:
        lines.append("")
        lines.append(f"Skipped ({len(skipped)}):")
        for path, why in skipped:
            lines.append(f"- `{path}`: {why}")
    return "\n".join(lines) + "\n"


def short(key: str) -> str:
    return key[:-5] if key.endswith(".name") else key


def fmt_value(v: Any) -> str:
    if isinstance(v, tuple):
        return "[" + ",".join(fmt_num(x) for x in v) + "]"
    if isinstance(v, float):
        return fmt_num(v)
    return str(v)


RUN_COLUMNS = ["run", "status", "dataset", "model", "latents", "objective", "estimator", "m", "k", "mk", "beta",
               "seed", "epochs", "test_nll", "test_nll_stderr", "eval_k", "n_test"]


def runs_csv(runs: Sequence[Run], extra_keys: Sequence[str]) -> str:
    extra_keys = _csv_extra(extra_keys)
    l_keys = lk_keys(k for r in runs for k in metric_values(r))
    surgery = [key for key, _ in SURGERY if any(key in r.test for r in runs)]
    diagnostics = [k for k in ("neg_kl_qp",) + WEIGHT_KEYS if any(metric_values(r).get(k) is not None for r in runs)]
    cols = RUN_COLUMNS + l_keys + diagnostics + ["active_units", "latent_units"] + surgery + \
        ["train_bound", "valid_bound"] + _jvi_columns(runs) \
        + ["wall_time_s", "device", "test_images", "training_data", "data_source"] + list(extra_keys) \
        + ["detail", "hint", "path"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in runs:
        values = {**_config_columns(r), "run": r.name, "status": r.status, "detail": r.detail, "hint": r.hint,
                  "path": str(r.path)}
        if r.status in ("finished", "duplicate"):
            mv = metric_values(r)
            values.update({k: v for k, v in mv.items() if k != "active_units"})
            values["active_units"] = fmt_list(mv.get("active_units"))
            values["latent_units"] = fmt_list(r.test.get("latent_units"))
            values["device"] = r.train.get("device", "")
            values["test_images"] = test_images(r) or ""        # the whole sha256 (the data column: its start)
            values["training_data"] = training_data(r) or ""
            values["data_source"] = str(r.train.get("data_source") or "")
        for key in extra_keys:  # (a key the run lacks: an unfinished run's DATA, a failed job's unrecorded setting)
            values[key] = fmt_value(r.flat[key]) if key in r.flat else ""
        w.writerow([fmt_num(values.get(c)) if not isinstance(values.get(c), str) else values.get(c) for c in cols])
    return buf.getvalue()


def _jvi_columns(runs: Sequence[Run]) -> List[str]:
    """objective=jvi trains on the JVI estimate, not a bound: its own columns, when there are such runs."""
    has = any("train_jvi_estimate" in metric_values(r) for r in runs if r.status == "finished")
    return ["train_jvi_estimate", "valid_jvi_estimate"] if has else []


def summary_csv(groups: Sequence[Group], extra_keys: Sequence[str],
                published: Optional[Dict[int, Dict[str, Any]]] = None) -> str:
    """published: extra columns per group (by id), e.g. vaexp.report.published.columns."""
    published, extra_keys = published or {}, _csv_extra(extra_keys)
    metrics = ["test_nll"] + lk_keys(k for g in groups for r in g.runs for k in metric_values(r))
    metrics += [k for k in ("neg_kl_qp",) + WEIGHT_KEYS
                if any(metric_values(r).get(k) is not None for g in groups for r in g.runs)]
    metrics += [key for key, _ in SURGERY if any(key in r.test for g in groups for r in g.runs)]
    metrics += ["train_bound", "valid_bound"] + _jvi_columns([r for g in groups for r in g.runs]) + ["wall_time_s"]
    cols = ["dataset", "model", "latents", "objective", "estimator", "m", "k", "mk", "beta", "eval_k", "n_test",
            "n_seeds", "seeds"] + [f"{m}_{s}" for m in metrics for s in ("mean", "std")] + \
        ["active_units_mean", "latent_units"] + list(extra_keys) \
        + sorted({c for extra in published.values() for c in extra})
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
            values["active_units_mean"] = ";".join(fmt_num(a) for a in units[0])
            values["latent_units"] = ";".join(fmt_num(u) for u in units[1])
        for key in extra_keys:
            values[key] = fmt_value(g.first.flat.get(key))
        values.update({k: (str(v).lower() if isinstance(v, bool) else v) for k, v in published.get(id(g), {}).items()})
        w.writerow([values.get(c) if isinstance(values.get(c), str) else fmt_num(values.get(c)) for c in cols])
    return buf.getvalue()


