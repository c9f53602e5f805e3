"""`vaexp report <dir>...`: every run under the given directories as tables and plots.

runs.py finds, judges and groups the runs; tables.py writes report.md, runs.csv, summary.csv;
plots.py the PNGs. Invariant: nothing is written when there is nothing to report (one line,
exit 2); reading finished runs needs no torch.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from vaexp.errors import one_line
from vaexp.report.plots import (plot_contexts, plot_curves, plot_heatmaps, plot_nll_curves, plot_nll_vs_m,
                                read_curves)
from vaexp.report.runs import (GRID_KEYS, IGNORED, LINE_KEYS, STANDARD_KEYS, Group, ReportError, Run, check_dirs,
                               find_runs, group_runs, sort_key, split_duplicates, varying_keys)
from vaexp.report import published
from vaexp.report.tables import markdown, runs_csv, short, summary_csv
from vaexp.rundir import atomic_write_text

__all__ = ["Group", "ReportError", "Run", "check_dirs", "find_runs", "group_runs", "read_curves", "report",
           "varying_keys"]


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
    finished = sorted([r for r in runs if r.status == "finished"], key=sort_key)
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
    finished = sorted(finished, key=sort_key)
    for dup, orig in duplicates:
        dup.status, dup.detail = "duplicate", f"same settings and seed as {orig.name}; counted once"
    groups = group_runs(finished)
    groups.sort(key=lambda g: sort_key(g.first))
    extra = varying_keys(finished, IGNORED + STANDARD_KEYS)
    extra = [k for k in extra if not k.startswith("eval.")] + [k for k in extra if k.startswith("eval.")]
    common = {}
    for key in ("dataset.name", "model.name", "estimator.name"):
        values = {repr(r.flat.get(key)) for r in finished}
        if len(values) == 1:
            common[key] = finished[0].flat.get(key)
    contexts = plot_contexts(groups)
    against = published.compare(groups)
    pairs_md, pairs = _paired_section(finished)
    md = markdown(groups, unfinished, skipped, extra, common, duplicates) + _sections(
        published.markdown(against), pairs_md, _plot_index(contexts) if plots else "")

    out_dir = Path(str(out)) if out else Path(str(dirs[0])) / "report"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"out={out_dir}: cannot create it ({one_line(e)}); pass a writable out=<dir>") from None
    written = []
    files = [("report.md", md), ("runs.csv", runs_csv(finished + [d for d, _ in duplicates] + unfinished, extra)),
             ("summary.csv", summary_csv(groups, extra, published.columns(against)))]
    if pairs:
        files.append(("compare.csv", pairs))
    for name, text in files:
        atomic_write_text(out_dir / name, text)
        written.append(out_dir / name)

    notes = []
    if len(contexts) > 1:
        keys = varying_keys([gs[0].first for _, _, gs in contexts], IGNORED + LINE_KEYS + GRID_KEYS)
        notes.append(f"the runs differ in {', '.join(short(k) for k in keys)}: their NLLs are not comparable in "
                     f"one plot, so each combination gets its own plots ({len(contexts)} sets, ctx1..ctx{len(contexts)} "
                     f"in the file names; report.md lists them)")
    plotted: List[Path] = []
    if plots:
        for title, suffix, gs in contexts:
            sub = plot_nll_vs_m(gs, title, out_dir, suffix)
            sub += plot_heatmaps(gs, title, out_dir, suffix)
            sub += plot_nll_curves(gs, title, out_dir, suffix)
            if curves:
                members = [r for g in gs for r in g.runs]
                ctx = gs[0].first.training_context
                members += [r for r in unfinished if r.training_context == ctx]
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


def _sections(*parts: str) -> str:
    return "".join("\n" + p for p in parts if p)


def _plot_index(contexts) -> str:
    """Which plot files belong to which set of comparable runs (when there are several)."""
    if len(contexts) < 2:
        return ""
    lines = ["## Plots", "", "Runs whose NLLs are comparable are plotted together; each set has its own files:", ""]
    lines += [f"- `*{suffix}.png`: {title}" for title, suffix, _ in contexts]
    return "\n".join(lines) + "\n"


def _paired_section(finished: Sequence[Run]):
    """(markdown, CSV) of the paired per-image comparisons (vaexp.report.compare): ("", "") for one
    setting; the section without a table when no pair is comparable, saying why."""
    from vaexp.report import compare  # loads torch (the per-image files): only when there is something to compare

    if len(group_runs(finished)) < 2:
        return "", ""
    settings, notes = compare.settings_of(finished)
    rows, refused = compare.compare_settings(settings)
    return compare.markdown(rows, refused, notes), (compare.to_csv(rows) if rows else "")
