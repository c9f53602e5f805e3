"""`vaexp compare <dir>...`: paired per-image comparisons of finished runs.

Two runs are comparable when they scored the same binarised test images with the same
estimator of log p(x): the same dataset settings that fix the test set (name, binarize_seed,
and the generator settings of synthetic data), the same number of test images, and the same
eval.k and eval.seed; and the same data (vaexp.report.runs.assign_data: the sha256 of the
scored test images, or for an evaluation that predates it the recorded data source; one whose
data are not recorded at all is compared on its settings). Runs of one setting (vaexp.report's
grouping: they differ only in seed) are combined by averaging each image's estimate over the
seeds; the paired difference of two settings is then taken image by image, and its mean,
standard error (over images), 95% interval and paired t-test (vaexp.stats) describe it. That
standard error is the test-set and Monte Carlo uncertainty; training variability across seeds
shows in the report's seed std. Invariant: a pair that is not comparable is never compared; the
reason is given instead.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from vaexp import rundir, stats
from vaexp.report.runs import (DATA, IGNORED, Group, ReportError, Run, find_runs, group_runs,
                               same_data, split_duplicates, test_images, test_set_settings, varying_keys)
from vaexp.report.tables import fmt_value

# The per-image quantities compared, as stored in test_log_px.*.pt: log p̂ (L_K) and the L_k bounds.
QUANTITIES = (("log_px", "log p̂"), ("L1", "L_1"), ("L64", "L_64"))


def test_set_key(run: Run) -> Tuple:
    """What makes two runs' per-image estimates comparable (see the module docstring): the
    dataset settings that fix the test images, and the latest evaluation's K, number of test
    images and seed (as it stored them: vaexp.report.runs puts them in run.flat)."""
    keys = dict(test_set_settings(run))
    for key in ("eval.k", "eval.seed"):
        keys[key] = repr(run.flat.get(key))
    return tuple(sorted(keys.items()))


def per_image(run: Run) -> Dict[str, torch.Tensor]:
    """The latest evaluation's per-image estimates (fp64), by QUANTITIES name."""
    name = run.evaluation.get("per_example") or rundir.PER_EXAMPLE
    path = run.path / name
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a missing or damaged file names itself
        raise ReportError(f"{path}: cannot read the per-image estimates ({type(e).__name__}); "
                          f"re-evaluate the run with `vaexp eval {run.path}`") from None
    return {k: v.double() for k, v in tensors.items() if torch.is_tensor(v)}


@dataclass
class Setting:
    """One setting's per-image estimates, averaged over its seeds."""

    group: Group
    label: str
    values: Dict[str, torch.Tensor]   # QUANTITIES name -> [n] mean over seeds
    key: Tuple
    images: Optional[str] = None      # the scored test images' sha256 (None: not recorded)
    data: Optional[Tuple[str, str]] = None  # its runs' data identity (vaexp.report.runs.assign_data)
    data_label: str = ""

    @property
    def nll(self) -> float:
        return float(-self.values["log_px"].mean())

    @property
    def seeds(self) -> List[Any]:
        return [r.flat.get("seed") for r in self.group.runs]


def _label(run: Run, varying: Sequence[str]) -> str:
    f = run.flat
    parts = [f"{f.get('objective.name')} m={f.get('m')} k={f.get('k')} {f.get('estimator.name')}"]
    if f.get("beta") is not None:  # ciwae's (vaexp.report.runs sets it to None where it weighs nothing)
        parts.append(f"β={f.get('beta')}")
    parts += [f"{k}={fmt_value(f.get(k))}" for k in varying]  # as the report's tables write them
    return " ".join(parts)


def settings_of(runs: Sequence[Run]) -> Tuple[List[Setting], List[str]]:
    """(settings with their seed-averaged per-image values, notes on what could not be combined)."""
    groups = group_runs(runs)
    shown = ("objective.name", "estimator.name", "m", "k", "beta", "seed")
    varying = varying_keys([g.first for g in groups], IGNORED + shown)
    out, notes = [], []
    for g in groups:
        keys = {test_set_key(r) for r in g.runs}
        digests = {test_images(r) for r in g.runs} - {None}
        if len(keys) > 1 or len(digests) > 1:
            notes.append(f"{g.first.name}: its seeds were evaluated on different test sets or eval settings; "
                         f"compared seed by seed is not possible, left out")
            continue
        kept, loaded = [], []
        for r in g.runs:
            try:
                loaded.append(per_image(r))
                kept.append(r)
            except ReportError as err:  # a seed without its per-image file cannot be paired; the others can
                notes.append(f"{r.name}: {err}" + ("" if len(g.runs) == 1 else
                                                   "; its setting is compared on its other seeds"))
        if not kept:
            continue
        g = Group(kept)
        values = {}
        for q, _ in QUANTITIES:
            if all(q in t for t in loaded) and len({t[q].shape for t in loaded}) == 1:
                values[q] = torch.stack([t[q] for t in loaded]).mean(0)
        if "log_px" not in values:
            notes.append(f"{g.first.name}: no per-image log p̂ in its test_log_px file, left out")
            continue
        out.append(Setting(g, _label(g.first, varying), values, keys.pop(), digests.pop() if digests else None,
                           g.first.data, str(g.first.flat.get(DATA, ""))))
    return sorted(out, key=lambda s: s.nll), notes


def why_not_comparable(a: Setting, b: Setting) -> str:
    da, db = dict(a.key), dict(b.key)
    diff = [f"{k}: {da.get(k)} vs {db.get(k)}" for k in sorted(set(da) | set(db)) if da.get(k) != db.get(k)]
    return "; ".join(diff)


def why_other_data(a: Setting, b: Setting) -> str:
    if a.data and b.data and a.data[:2] == b.data[:2]:
        return ("the same test images, but trained on other data: the sha256 of the training and validation data "
                "their runs read differ (train.training_data in metrics.json; see each run's train.data_source)")
    if (a.images and b.images) or (a.data and b.data and a.data[0] == b.data[0] == "sha256"):
        return ("the same test-set settings, but other test images were scored: their sha256 differ, so the data "
                "came from other files; see each run's train.data_source in metrics.json")
    return (f"the same test-set settings, but other data: {a.data_label} vs {b.data_label}; an evaluation that did "
            f"not record the sha256 of its test images is told apart by the data source its run recorded")


@dataclass
class Row:
    a: Setting
    b: Setting
    results: Dict[str, stats.Paired]   # quantity -> paired summary of a − b


def compare_settings(settings: Sequence[Setting]) -> Tuple[List[Row], List[str]]:
    """Every comparable pair (in NLL order: a is the better of the two), and the refusals."""
    rows, refused = [], []
    for i, a in enumerate(settings):
        for b in settings[i + 1:]:
            if a.key != b.key:
                refused.append(f"{a.label} vs {b.label}: not comparable ({why_not_comparable(a, b)})")
                continue
            if (a.images and b.images and a.images != b.images) or not same_data(a.data, b.data):
                refused.append(f"{a.label} vs {b.label}: not comparable ({why_other_data(a, b)})")
                continue
            results = {q: stats.paired((a.values[q] - b.values[q]).tolist())
                       for q, _ in QUANTITIES if q in a.values and q in b.values and a.values[q].numel() > 1}
            if "log_px" not in results:
                refused.append(f"{a.label} vs {b.label}: fewer than 2 test images")
                continue
            rows.append(Row(a, b, results))
    return rows, refused


def _p(p: float) -> str:
    return "< 1e-300" if p == 0.0 else (f"{p:.2g}" if p < 0.001 else f"{p:.3f}")


def markdown(rows: Sequence[Row], refused: Sequence[str], notes: Sequence[str]) -> str:
    lines = ["## Paired comparisons (per test image)", "",
             "Δ = A − B of the per-image estimates on the same binarised test images (A has the lower NLL); "
             "> 0 means A assigns the images a higher likelihood. Several seeds of a setting are averaged "
             "image by image first; ± is the standard error over images, the interval is 95% (Student's t), "
             "p is the two-sided paired t-test.", ""]
    if rows:
        lines += ["| A | B | NLL A | NLL B | Δ log p̂ | 95% interval | t | p | Δ L_1 | Δ L_64 | images | seeds A / B |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            main = r.results["log_px"]
            extra = [f"{r.results[q].mean:+.3f} ± {r.results[q].se:.3f}" if q in r.results else "–" for q in ("L1", "L64")]
            lines.append(f"| {r.a.label} | {r.b.label} | {r.a.nll:.2f} | {r.b.nll:.2f} | {main.mean:+.3f} ± {main.se:.3f} "
                         f"| [{main.low:+.3f}, {main.high:+.3f}] | {main.t:.2f} | {_p(main.p)} | {extra[0]} | {extra[1]} "
                         f"| {main.n} | {len(r.a.seeds)} / {len(r.b.seeds)} |")
    else:
        lines.append("No comparable pair of settings.")
    for title, items in (("Not compared", refused), ("Left out", notes)):
        if items:
            lines += ["", f"{title}:"] + [f"- {item}" for item in items]
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[Row]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = ["a", "b", "nll_a", "nll_b", "n_images", "seeds_a", "seeds_b"]
    for q, _ in QUANTITIES:
        cols += [f"{q}_diff", f"{q}_se", f"{q}_low", f"{q}_high", f"{q}_t", f"{q}_p"]
    w.writerow(cols)
    for r in rows:
        values = [r.a.label, r.b.label, repr(r.a.nll), repr(r.b.nll), r.results["log_px"].n,
                  ";".join(map(str, r.a.seeds)), ";".join(map(str, r.b.seeds))]
        for q, _ in QUANTITIES:
            p = r.results.get(q)
            values += [repr(v) for v in (p.mean, p.se, p.low, p.high, p.t, p.p)] if p else [""] * 6
        w.writerow(values)
    return buf.getvalue()


def compare(dirs: Sequence[str], out: Optional[str] = None, write: bool = True) -> Dict[str, Any]:
    """Find the finished runs under `dirs`, compare every comparable pair of settings, write
    compare.md and compare.csv to `out` (default <first dir>/report). Raises ReportError when
    there is nothing to compare (with the reason)."""
    runs, skipped = find_runs(dirs)
    finished, duplicates = split_duplicates([r for r in runs if r.status == "finished"])
    if len(finished) < 2:
        raise ReportError(f"vaexp compare needs at least two finished runs under {', '.join(map(str, dirs))}; "
                          f"found {len(finished)}")
    settings, notes = settings_of(finished)
    notes = [f"{d.name} repeats {o.name} (the same setting and seed, e.g. a copied run directory): counted once"
             for d, o in duplicates] + notes
    if len(settings) < 2:
        if len(group_runs(finished)) < 2:
            raise ReportError("the finished runs are all one setting (they differ only in seed): nothing to compare"
                              + (f"; {'; '.join(notes)}" if notes else ""))
        raise ReportError("fewer than two settings can be compared: " + "; ".join(notes))
    rows, refused = compare_settings(settings)
    if not rows:
        raise ReportError("no two settings are comparable: " + "; ".join(refused + notes))
    md = markdown(rows, refused, notes)
    result = {"rows": rows, "settings": settings, "refused": refused, "notes": notes, "markdown": md,
              "csv": to_csv(rows)}
    if write:
        out_dir = Path(str(out)) if out else Path(str(dirs[0])) / "report"
        out_dir.mkdir(parents=True, exist_ok=True)
        rundir.atomic_write_text(out_dir / "compare.md", md)
        rundir.atomic_write_text(out_dir / "compare.csv", result["csv"])
        result["out"] = out_dir
    return result
