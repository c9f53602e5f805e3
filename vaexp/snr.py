"""`vaexp snr`: the signal-to-noise ratio of gradient estimates at fixed parameters.

Per parameter SNR = |E[Δ]| / std[Δ] (ddof 1) over R independent draws of the gradient estimate Δ
for a *fixed* minibatch (Rainforth et al. 2018), summarised over θ and over φ by mean and median,
per (M, K) cell and estimator; slopes of log SNR on log K and log M by least squares.
Invariants: the draws are vaexp.gradstats' (the trainer's own losses, vectorised, one forward
pass of a draw shared by every estimator: common random numbers), so θ is reported once ("all")
and each φ estimator's bias statistic against reparam's φ gradient uses exact pairs (reparam is
drawn as the reference when not listed); every cell has its own seeded stream, so results do not
depend on the other cells. A zero-mean gradient reads ≈ 0.8/√R (the floor): summaries below 3x
that are marked '*'. The output directory is a transaction like a train run's (check_out_dir):
another command's output or a measurement with other settings there is refused before anything
is written, this measurement finished is reported, and the results (config.yaml, snr.txt,
snr.png, TensorBoard events, snr.csv last) are written atomically, one after the other, only once
measured.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from vaexp import rundir, runtime
from vaexp.data import binarize, load_dataset
from vaexp.errors import VaexpError
from vaexp.estimators import get_estimator
from vaexp.gradstats import (GradientSampler, Moments, bias_z, draw_moments, per_parameter_snr,  # noqa: F401
                             summarise)
from vaexp.models import build_model
from vaexp.objectives import make_objective
from vaexp.runtime import resolve_device
from vaexp.schema import TrainConfig
from vaexp.tblog import RunLogger

CSV_NAME = rundir.SNR_CSV
PNG_NAME = "snr.png"
TXT_NAME = "snr.txt"
# A finished measurement: its settings and its results, written together once measured (config.yaml
# first, snr.csv - the sweep summary's done file - last; TensorBoard events before it).
RESULT_FILES = (rundir.CONFIG, TXT_NAME, PNG_NAME, CSV_NAME)
THETA, PHI = "theta", "phi"
ALL = "all"  # θ's row: the same gradient for every estimator
_FLOOR = math.sqrt(2 / math.pi)  # E|Z| for Z ~ N(0, 1): the SNR of a zero-mean gradient is ≈ this / √R


# -- the grid --------------------------------------------------------------------------------------

def grid_cells(ks: Sequence[int], ms: Sequence[int], mode: str) -> List[Tuple[int, int]]:
    """(M, K) cells: axes = a K sweep at M = m[0] and an M sweep at K = k[0]; cross = all pairs."""
    ks, ms = list(dict.fromkeys(int(v) for v in ks)), list(dict.fromkeys(int(v) for v in ms))
    if mode == "cross":
        return [(m, k) for m in ms for k in ks]
    cells = [(ms[0], k) for k in ks] + [(m, ks[0]) for m in ms[1:]]
    return list(dict.fromkeys(cells))


def cell_seed(seed: int, m: int, k: int) -> int:
    """Each cell's own stream: results do not depend on which other cells are in the grid."""
    return (seed * 1_000_003 + m * 7_919 + k * 104_729 + 17) % (2 ** 63)


@dataclass
class Row:
    estimator: str  # "all" for θ
    network: str    # theta | phi
    m: int
    k: int
    draws: int
    mean: float     # mean over parameters of the per-parameter SNR
    median: float
    params: int
    excluded: int
    # φ rows: the bias statistic √S of the paired differences against reparam's φ gradient of the
    # same draws (vaexp.gradstats); NaN for θ and for reparam itself
    bias_z: float = float("nan")


def measure(sampler: GradientSampler, cells: Sequence[Tuple[int, int]], draws: int, chunk: int, seed: int,
            device: torch.device, progress: bool = False, shown: Optional[int] = None) -> Tuple[List[Row], Dict]:
    """Every cell: R draws in chunks; per-parameter SNR summaries, and each φ estimator's bias
    statistic against reparam when reparam is among the sampler's estimators. The first `shown`
    estimators get rows (None: all; a reparam appended only as the bias reference gets none).
    Also returns the per-parameter SNR tensors, keyed (estimator, network, m, k)."""
    names = [e.name for e in sampler.estimators]
    shown = len(names) if shown is None else shown
    reference = names.index("reparam") if "reparam" in names else None
    bar = _bar(sum(draws * m * k for m, k in cells), progress)
    rows: List[Row] = []
    per_param: Dict[Tuple[str, str, int, int], Tensor] = {}
    for m, k in cells:
        gen = torch.Generator(device=device).manual_seed(cell_seed(seed, m, k))
        if bar is not None:
            bar.set_description(f"snr M={m} K={k}", refresh=False)
        theta, phi, diff = draw_moments(sampler, m, k, draws, chunk, gen, reference,
                                        None if bar is None else (lambda n, m=m, k=k: bar.update(n * m * k)))
        entries = [(ALL, THETA, theta, None)] + [(e, PHI, mom, d) for e, mom, d in zip(names, phi, diff)][:shown]
        for est, net, mom, d in entries:
            snr = per_parameter_snr(mom.mean, mom.std()).cpu()
            per_param[(est, net, m, k)] = snr
            s = summarise(snr)
            rows.append(Row(est, net, m, k, draws, s["mean"], s["median"], s["params"], s["excluded"],
                            bias_z(d) if d is not None else float("nan")))
    if bar is not None:
        bar.close()
    return rows, per_param


def series(rows: Iterable[Row]) -> List[Tuple[str, str]]:
    """(estimator, network) pairs in display order: θ first, then φ per estimator."""
    return list(dict.fromkeys((r.estimator, r.network) for r in rows))


def fit_slopes(rows: Sequence[Row], summary: str = "mean") -> Dict[Tuple[str, str], Tuple[float, float]]:
    """Per (estimator, network): (d log SNR / d log K, d log SNR / d log M) by least squares on
    log SNR = a + s_K log K + s_M log M over the cells (NaN where K or M does not vary)."""
    out = {}
    for key in series(rows):
        pts = [(r.k, r.m, getattr(r, summary)) for r in rows if (r.estimator, r.network) == key]
        pts = [p for p in pts if math.isfinite(p[2]) and p[2] > 0]
        ks, ms = {p[0] for p in pts}, {p[1] for p in pts}
        cols = [[1.0] * len(pts)]
        if len(ks) > 1:
            cols.append([math.log(p[0]) for p in pts])
        if len(ms) > 1:
            cols.append([math.log(p[1]) for p in pts])
        if len(pts) < len(cols) or len(cols) == 1:
            out[key] = (float("nan"), float("nan"))
            continue
        X = torch.tensor(cols, dtype=torch.float64).T
        y = torch.tensor([math.log(p[2]) for p in pts], dtype=torch.float64).unsqueeze(1)
        coef = torch.linalg.lstsq(X, y).solution.squeeze(1).tolist()
        s_k = coef[1] if len(ks) > 1 else float("nan")
        s_m = coef[-1] if len(ms) > 1 else float("nan")
        out[key] = (s_k, s_m)
    return out


def noise_floor(draws: int) -> float:
    return _FLOOR / math.sqrt(draws)


# -- the point to measure at -------------------------------------------------------------------------

def run_config(run) -> DictConfig:
    """The config of the vaexp train run in `run` (its model and dataset are what snr measures)."""
    return OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(Path(run) / rundir.CONFIG))


def checkpoint_position(state: Dict) -> Dict[str, int]:
    """Where a run's checkpoint stands (what snr measured with run=): its epoch and global step."""
    return {"epoch": int(state["state"]["epoch"]), "global_step": int(state["state"]["global_step"])}


def recorded_config(cfg, saved: Optional[DictConfig] = None, position: Optional[Dict] = None) -> Dict:
    """What config.yaml records: the command's settings, resolved; with run=, the model and dataset
    are the run's own (`saved`, its config: what was measured, not snr's unused defaults), perturb
    is null (it applies only to the analytic model) and `checkpoint` is the measured checkpoint's
    position (`position`, read from the run when None; null without run=)."""
    cfg = rundir.task_config(cfg)
    record = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    record["checkpoint"] = None
    if cfg.run:
        saved = run_config(cfg.run) if saved is None else saved
        for key in ("model", "dataset"):
            record[key] = OmegaConf.to_container(saved[key], resolve=True, enum_to_str=True)
        record["perturb"] = None
        record["checkpoint"] = position if position is not None else \
            checkpoint_position(rundir.load_checkpoint(Path(cfg.run)))
    return record


# -- the output directory -------------------------------------------------------------------------------

_NEW_DIR = "use a new output directory for vaexp snr (drop hydra.run.dir=, or give another)"


def _is_snr_record(record) -> bool:
    """config.yaml as vaexp snr writes it (a train run's has schedule and an int k)."""
    return isinstance(record, dict) and isinstance(record.get("k"), list) and isinstance(record.get("m"), list) \
        and "draws" in record and "schedule" not in record


def check_out_dir(cfg, out_dir: Path) -> bool:
    """Whether `vaexp snr` with `cfg` may write into out_dir, read before anything is written there
    (by the callback before Hydra writes .hydra/, and by the command under the directory's lock):
    rundir.RunDirTaken when it holds another command's output (a train run: config.yaml of another
    command, checkpoint.pt, metrics.json, Hydra's record of another command; a sweep directory) or a
    measurement with other settings (another checkpoint of the same run too), or snr results whose
    settings are unknown (no config.yaml). True when it already holds this measurement, finished
    (the command then reports it, as `vaexp train` a finished run); False: measure."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return False
    for name in (rundir.CHECKPOINT, rundir.METRICS, rundir.MULTIRUN_RECORD):
        if (out_dir / name).exists():
            what = "a sweep directory" if name == rundir.MULTIRUN_RECORD else "a vaexp train run"
            raise rundir.RunDirTaken(f"{out_dir} holds the output of another command ({what}: {out_dir / name}); "
                                     f"{_NEW_DIR}")
    job = rundir.hydra_job(out_dir)
    if job not in (None, "snr"):
        raise rundir.RunDirTaken(f"{out_dir} holds the output of another command "
                                 f"({out_dir / rundir.HYDRA_DIR / 'hydra.yaml'} records "
                                 f"{'vaexp ' + job if job != '?' else 'no vaexp snr command'}); {_NEW_DIR}")
    config = out_dir / rundir.CONFIG
    if not config.exists():
        results = [name for name in RESULT_FILES if (out_dir / name).exists()]
        if results:
            raise rundir.RunDirTaken(f"{out_dir / results[0]}: snr results without their {rundir.CONFIG}, so "
                                     f"with unknown settings, which this command would replace; {_NEW_DIR}")
        return False
    saved = rundir.as_dict(rundir.load_config(out_dir))  # VaexpError naming the file when unreadable
    if not _is_snr_record(saved):
        raise rundir.RunDirTaken(f"{out_dir} holds the output of another command ({config} is not a vaexp snr "
                                 f"config); {_NEW_DIR}")
    theirs, ours = rundir.described(saved), rundir.described(recorded_config(cfg))
    diffs = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
    if diffs:
        shown = ", ".join(f"{k}={ours.get(k)} (saved: {theirs.get(k)})" for k in diffs[:4])
        if any(k.startswith("checkpoint.") for k in diffs):
            shown += f" (the run {cfg.run} is not at the checkpoint it measured)"
        raise rundir.RunDirTaken(f"{out_dir} already holds an snr measurement with other settings: {shown}; "
                                 f"{_NEW_DIR}, or run it with its own settings (in {config})")
    return all((out_dir / name).is_file() for name in RESULT_FILES)


def load_point(cfg, device: torch.device, saved: Optional[DictConfig] = None):
    """(model, data, description, position): a trained run's checkpoint (`saved`: its config, read
    from the run when None; position: checkpoint_position), or the analytic model at its optimum for
    the training data plus N(0, perturb²) on every parameter (Rainforth et al.; position None)."""
    if cfg.run:
        run = Path(cfg.run)
        saved = run_config(run) if saved is None else saved
        data = load_dataset(saved.dataset, device)
        model = build_model(saved.model, data).to(device)
        state = rundir.load_checkpoint(run, map_location=device)
        model.load_state_dict(state["model"])
        where = (f"run {run} (epoch {state['state']['epoch']}, step {state['state']['global_step']}; "
                 f"{saved.dataset.name}, {saved.model.name})")
        return model, data, where, checkpoint_position(state)
    data = load_dataset(cfg.dataset, device)
    model = build_model(cfg.model, data).to(device)
    model.set_optimum(data.train)
    model.perturb(cfg.perturb, torch.Generator(device=device).manual_seed(cfg.seed))
    where = (f"the analytic model (D={data.train.shape[1]}, {len(model.encoder)} stochastic layer(s), "
             f"q_var={cfg.model.q_var:.4g}) at its optimum for the {data.train.shape[0]} training points, "
             f"perturbed by N(0, {cfg.perturb}^2) (seed {cfg.seed})")
    return model, data, where, None


def minibatch(data, index: int, batch: int, seed: int) -> Tensor:
    """The fixed minibatch: training rows index..index+batch-1, binarised once (seeded) for
    Bernoulli data, used as they are for real-valued data."""
    n = data.train.shape[0]
    if index + batch > n:
        raise VaexpError(f"index={index} batch={batch}: the minibatch runs past the {n} training points; "
                         f"lower index or batch")
    x = data.train[index:index + batch]
    if data.binary:
        x = binarize(x, torch.Generator(device=x.device).manual_seed(seed))
    return x


# -- the command --------------------------------------------------------------------------------------

def snr(cfg, out_dir: Path) -> Dict:
    """`vaexp snr`: measure, then write config.yaml (the settings, with run= the run's model and
    dataset and the checkpoint's position: see recorded_config), snr.txt, snr.png, TensorBoard
    scalars and snr.csv, each atomically and all only once measured: an interrupted or failed
    command leaves the directory as it was (the error boundary removes what it added). A
    directory that holds another command's output, or a measurement with other settings, is
    refused (check_out_dir); one that holds this measurement, finished, is reported
    ({"finished": True, "table": its snr.txt}), not measured again."""
    out_dir = Path(out_dir)
    if check_out_dir(cfg, out_dir):
        return {"finished": True, "table": (out_dir / TXT_NAME).read_text().rstrip("\n"), "out_dir": out_dir,
                "rows": read_csv(out_dir / CSV_NAME)}
    device = resolve_device(cfg.device)
    runtime.hold_threads_for(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = run_config(cfg.run) if cfg.run else None
    model, data, where, position = load_point(cfg, device, saved)
    model.eval()
    x = minibatch(data, cfg.index, cfg.batch, cfg.seed)
    obj = make_objective(cfg.objective.name, cfg.beta)
    names = list(dict.fromkeys(cfg.estimators))
    ests = [get_estimator(e, cfg.alpha if e == "gdreg" else None) for e in names]
    reference = [] if "reparam" in names or names == [] else [get_estimator("reparam")]  # the bias reference
    sampler = GradientSampler(model, x, obj, ests + reference)
    cells = grid_cells(cfg.k, cfg.m, cfg.grid)
    t0 = time.perf_counter()
    rows, _ = measure(sampler, cells, cfg.draws, cfg.chunk, cfg.seed, device, cfg.progress, shown=len(ests))
    elapsed = time.perf_counter() - t0
    slopes = {s: fit_slopes(rows, s) for s in ("mean", "median")}
    header = (f"gradient SNR = |mean| / std per parameter over R={cfg.draws} draws, objective={cfg.objective.name} "
              f"(M outside the log, K inside), a fixed minibatch of {cfg.batch} training point(s) from index "
              f"{cfg.index};\nat {where}.\n"
              f"P_theta={sampler.sizes[0]}, P_phi={sampler.sizes[1]}; a zero-mean gradient reads "
              f"~{noise_floor(cfg.draws):.3g} (0.8/sqrt(R)); '*' marks summaries below 3x that. {elapsed:.0f} s."
              + (f" gdreg: alpha={cfg.alpha:g}." if "gdreg" in names else ""))
    table = header + "\n\n" + "\n\n".join(format_table(rows, slopes[s], s, cfg.draws) for s in ("mean", "median"))
    table += "\n\n" + format_bias(rows)
    # Everything rendered first, then written in one go (see the docstring).
    config_text = OmegaConf.to_yaml(OmegaConf.create(recorded_config(cfg, saved, position)))
    png = plot_png(rows, cfg.draws, title=f"{cfg.objective.name}: gradient SNR, R={cfg.draws}")
    csv_bytes = csv_text(rows).encode()
    rundir.atomic_write_text(out_dir / rundir.CONFIG, config_text)
    rundir.atomic_write_text(out_dir / TXT_NAME, table + "\n")
    rundir.atomic_write_bytes(out_dir / PNG_NAME, png)
    write_tensorboard(out_dir, rows, slopes)
    rundir.atomic_write_bytes(out_dir / CSV_NAME, csv_bytes)
    return {"rows": rows, "slopes": slopes, "table": table, "out_dir": out_dir, "elapsed_s": elapsed,
            "finished": False}


def _label(m: int, k: int, m0: int, k0: int) -> str:
    if m == m0:
        return f"K={k}"
    if k == k0:
        return f"M={m}"
    return f"M={m},K={k}"


def format_table(rows: Sequence[Row], slopes: Dict, summary: str, draws: int) -> str:
    cells = list(dict.fromkeys((r.m, r.k) for r in rows))
    m0, k0 = cells[0]
    labels = [_label(m, k, m0, k0) for m, k in cells]
    floor3 = 3 * noise_floor(draws)
    head = ["estimator", "net"] + labels + ["dlogSNR/dlogK", "dlogSNR/dlogM"]
    lines = []
    for est, net in series(rows):
        by_cell = {(r.m, r.k): getattr(r, summary) for r in rows if (r.estimator, r.network) == (est, net)}
        vals = []
        for cell in cells:
            v = by_cell.get(cell, float("nan"))
            vals.append(f"{v:.3g}" + ("*" if math.isfinite(v) and v < floor3 else ""))
        s_k, s_m = slopes[(est, net)]
        lines.append([est, net] + vals + [_fmt_slope(s_k), _fmt_slope(s_m)])
    widths = [max(len(str(row[i])) for row in [head] + lines) for i in range(len(head))]
    text = [f"SNR, {summary} over parameters (M={m0} for the K columns, K={k0} for the M columns):"]
    text.append("  " + "  ".join(h.rjust(w) if i >= 2 else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths))))
    for row in lines:
        text.append("  " + "  ".join(str(c).rjust(w) if i >= 2 else str(c).ljust(w)
                                     for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(text)


def format_bias(rows: Sequence[Row]) -> str:
    """The bias statistic per φ estimator and cell (vaexp.gradstats.bias_z)."""
    cells = list(dict.fromkeys((r.m, r.k) for r in rows))
    m0, k0 = cells[0]
    labels = [_label(m, k, m0, k0) for m, k in cells]
    ests = [e for e, net in series(rows) if net == PHI and e != "reparam"]
    text = ["bias of the mean phi gradient against reparam's (same draws): z = sqrt(R |mean d|^2 / tr Cov d), "
            "d = est - reparam; O(1) (P(z > 4) <= 6e-5) for an estimator unbiased for the phi bound's gradient:"]
    if not ests or not any(math.isfinite(r.bias_z) for r in rows):
        return text[0] + "\n  (no phi estimator besides reparam)"
    head = ["estimator"] + labels
    lines = []
    for est in ests:
        by_cell = {(r.m, r.k): r.bias_z for r in rows if (r.estimator, r.network) == (est, PHI)}
        lines.append([est] + [f"{by_cell.get(c, float('nan')):.3g}" for c in cells])
    widths = [max(len(str(row[i])) for row in [head] + lines) for i in range(len(head))]
    for row in [head] + lines:
        text.append("  " + "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                                     for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(text)


def _fmt_slope(v: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:+.2f}"


_CSV_HEAD = ["estimator", "network", "m", "k", "draws", "snr_mean", "snr_median", "params", "excluded", "bias_z"]


def csv_text(rows: Sequence[Row]) -> str:
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(_CSV_HEAD)
    for r in rows:
        w.writerow([r.estimator, r.network, r.m, r.k, r.draws, repr(r.mean), repr(r.median), r.params, r.excluded,
                    repr(r.bias_z)])
    return f.getvalue()


def write_csv(path: Path, rows: Sequence[Row]) -> None:
    rundir.atomic_write_bytes(Path(path), csv_text(rows).encode())


def read_csv(path: Path) -> List[Row]:
    """snr.csv's rows (as write_csv wrote them)."""
    with open(path, newline="") as f:
        return [Row(r["estimator"], r["network"], int(r["m"]), int(r["k"]), int(r["draws"]), float(r["snr_mean"]),
                    float(r["snr_median"]), int(r["params"]), int(r["excluded"]), float(r["bias_z"]))
                for r in csv.DictReader(f)]


def write_tensorboard(out_dir: Path, rows: Sequence[Row], slopes: Dict) -> None:
    """snr_vs_k/<net>_<estimator>/<summary>_m<M> at step K, snr_vs_m/... at step M, and the slopes."""
    log = RunLogger(out_dir)
    for r in rows:
        for s in ("mean", "median"):
            v = getattr(r, s)
            log.scalars({f"snr_vs_k/{r.network}_{r.estimator}/{s}_m{r.m}": v}, r.k)
            log.scalars({f"snr_vs_m/{r.network}_{r.estimator}/{s}_k{r.k}": v}, r.m)
        if math.isfinite(r.bias_z):
            log.scalars({f"bias_vs_k/{r.estimator}/z_m{r.m}": r.bias_z}, r.k)
    for s, by_key in slopes.items():
        for (est, net), (s_k, s_m) in by_key.items():
            log.scalars({f"slope_k/{net}_{est}/{s}": s_k, f"slope_m/{net}_{est}/{s}": s_m}, 0)
    log.close()


_COLOURS = {ALL: "black", "reparam": "tab:blue", "stl": "tab:orange", "dreg": "tab:green", "rws": "tab:red",
            "rws_dreg": "tab:purple", "gdreg": "tab:brown", "dreg_norm": "tab:pink", "rws_dreg_norm": "tab:gray",
            "vimco": "tab:olive"}


def plot(path: Path, rows: Sequence[Row], draws: int, title: str = "") -> None:
    """plot_png written to `path`, atomically."""
    rundir.atomic_write_bytes(Path(path), plot_png(rows, draws, title))


def plot_png(rows: Sequence[Row], draws: int, title: str = "") -> bytes:
    """The PNG of: log–log SNR vs K (at M = m[0]) and, when M varies, SNR vs M (at K = k[0]); one
    line per estimator and network (mean over parameters solid, median dashed); the estimation
    floor dotted."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(dict.fromkeys((r.m, r.k) for r in rows))
    m0, k0 = cells[0]
    sweeps = [("K", lambda r: r.m == m0, lambda r: r.k, f"M={m0}")]
    if len({m for m, _ in cells}) > 1:
        sweeps.append(("M", lambda r: r.k == k0, lambda r: r.m, f"K={k0}"))
    fig, axes = plt.subplots(1, len(sweeps), figsize=(6.2 * len(sweeps), 4.6), squeeze=False)
    for ax, (axis, keep, xval, fixed) in zip(axes[0], sweeps):
        for est, net in series(rows):
            pts = sorted((xval(r), r.mean, r.median) for r in rows if (r.estimator, r.network) == (est, net) and keep(r))
            if len(pts) < 1:
                continue
            xs = [p[0] for p in pts]
            label = f"{'θ' if net == THETA else 'φ'} {est if est != ALL else '(all estimators)'}"
            style = dict(color=_COLOURS.get(est, None), marker="o" if net == THETA else "s")
            ax.plot(xs, [p[1] for p in pts], "-", label=label + " mean", **style)
            ax.plot(xs, [p[2] for p in pts], "--", alpha=0.5, label=label + " median", **style)
        ax.axhline(noise_floor(draws), color="grey", linestyle=":", label="floor 0.8/√R")
        ax.set_xscale("log")
        ax.set_yscale("log")
        grid_values = sorted({xval(r) for r in rows if keep(r)})
        ax.set_xticks(grid_values, [str(v) for v in grid_values])  # the grid's own values, not 2×10^0 ...
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(f"{axis} ({fixed})")
        ax.set_ylabel("gradient SNR (over parameters)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    return buf.getvalue()


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="sample", unit_scale=True, dynamic_ncols=True, desc="snr", leave=False)
