"""The report's plots (PNG): NLL vs M along each M·K line, (M, K) heatmaps, training curves.

Invariant: runs are plotted together only when they agree on every setting but objective,
estimator, β, M, K and seed (their NLLs are comparable); each other combination gets its own
files, named ctx<i> when there are several, with the full description in the plot's title.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from vaexp.report.runs import GRID_KEYS, IGNORED, LINE_KEYS, Group, Run, fmt_num, sort_key, varying_keys
from vaexp.report.tables import fmt_value, short


def plot_contexts(groups: Sequence[Group]) -> List[Tuple[str, str, List[Group]]]:
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
        title = ", ".join(fmt_value(f.get(k)) if k.endswith(".name") else f"{short(k)}={fmt_value(f.get(k))}"
                          for k in shown)
        # Short, unique file names (a value cut to fit a name could name two contexts alike);
        # the title carries the whole description, and report.md lists which file is which.
        suffix = "" if len(by) == 1 else f"_ctx{i + 1}"
        out.append((title, suffix, gs))
    return out


def _line_key(run: Run) -> Tuple[str, str, Optional[float]]:
    f = run.flat
    return (str(f.get("objective.name")), str(f.get("estimator.name")),
            f.get("beta"))  # None where it weighs nothing (vaexp.report.runs)


def _line_label(key: Tuple[str, str, Optional[float]]) -> str:
    obj, est, beta = key
    return f"{obj} β={fmt_num(beta)} ({est})" if beta is not None else f"{obj} ({est})"


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
        name = f"heatmap_{obj}_{est}" + (f"_beta{fmt_num(beta)}" if beta is not None else "") + f"{suffix}.png"
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


def curve_label(run: Run) -> str:
    """A run's legend entry: its setting and its seed (two seeds of one setting are two curves)."""
    f = run.flat
    return (f"{_line_label(_line_key(run))} M={f.get('m')} K={f.get('k')} seed={f.get('seed')}"
            + ("" if run.status == "finished" else f" ({run.status})"))


def plot_curves(runs: Sequence[Run], title: str, out: Path, suffix: str) -> List[Path]:
    curves = [(r, read_curves(r.path)) for r in runs]
    curves = [(r, c) for r, c in curves if c]
    if not curves:
        return []
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    cmap = plt.get_cmap("tab20" if len(curves) > 10 else "tab10")
    for n, (r, c) in enumerate(sorted(curves, key=lambda rc: (sort_key(rc[0]), str(rc[0].flat.get("seed"))))):
        # Every run its own colour and legend entry: two seeds of one setting are two curves.
        label = curve_label(r)
        q = "jvi_estimate" if "epoch/train_jvi_estimate" in c else "bound"  # jvi: the JVI estimate, dashed
        for j, (ax, tag) in enumerate(zip(axes, (f"epoch/train_{q}", f"epoch/valid_{q}"))):
            if tag in c:
                steps, values = zip(*c[tag])
                ax.plot(steps, values, color=cmap(n % cmap.N), lw=1.2, label=label if j == 0 else None,
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




def plot_nll_curves(groups: Sequence[Group], title: str, out: Path, suffix: str) -> List[Path]:
    """Test NLL against epoch (eval.every evaluations during training, then the final one), one
    panel per setting and one line per run: runs of different lengths compare at equal epochs."""
    panels = [(g, [(r, _nll_points(r)) for r in g.runs]) for g in groups]
    panels = [(g, [(r, pts) for r, pts in rs if len(pts) > 1]) for g, rs in panels]
    panels = [(g, rs) for g, rs in panels if rs]
    if not panels:
        return []
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False, sharey=True)
    cmap = plt.get_cmap("tab10")
    for ax, (g, rs) in zip(axes.flat, panels):
        f = g.first.flat
        for n, (r, pts) in enumerate(sorted(rs, key=lambda rp: str(rp[0].flat.get("seed")))):
            epochs, nlls = zip(*pts)
            ax.plot(epochs, nlls, marker="o", ms=3, lw=1.2, color=cmap(n % cmap.N), label=f"seed {r.flat.get('seed')}")
        ax.set_title(f"{_line_label(_line_key(g.first))} M={f.get('m')} K={f.get('k')}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("test NLL (nats)")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"test NLL during training (eval.every): {title}", fontsize=10)
    fig.tight_layout()
    written = out / f"nll_curves{suffix}.png"
    fig.savefig(written, dpi=110)
    plt.close(fig)
    return [written]


def _nll_points(run: Run) -> List[Tuple[int, float]]:
    """(epoch, test NLL) of the run's evaluations during training and its final one, with the
    final evaluation's K and test images only (an evaluation with other settings is not comparable)."""
    k, n = run.test.get("k"), run.test.get("n_test")
    pts = [(int(p["epoch"]), float(p["nll"])) for p in run.curve
           if p.get("nll") is not None and p.get("k") == k and p.get("n_test") == n]
    ck = run.evaluation.get("checkpoint") if isinstance(run.evaluation.get("checkpoint"), dict) else {}
    if run.test.get("nll") is not None and ck.get("epoch") is not None:
        pts.append((int(ck["epoch"]), float(run.test["nll"])))
    return sorted(dict(pts).items())
