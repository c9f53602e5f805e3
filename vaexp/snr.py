"""`vaexp snr`: the signal-to-noise ratio of gradient estimates at fixed parameters.

Per parameter SNR = |E[Δ]| / std[Δ] (ddof 1) over R independent draws of the gradient estimate Δ
for a *fixed* minibatch (Rainforth et al. 2018), summarised over θ and over φ by mean and median,
per (M, K) cell and estimator; slopes of log SNR on log K and log M by least squares.
Invariants: θ's and each estimator's φ gradient come from vaexp.estimators.surrogate_losses (the
trainer's own losses); the draws are vectorised with torch.func.vmap and share the forward pass
of a draw between estimators (common random numbers), so θ is reported once ("all"); every cell
has its own seeded stream, so results do not depend on the other cells. A zero-mean gradient
reads ≈ 0.8/√R (the floor): summaries below 3x that are marked '*'.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from vaexp import rundir
from vaexp.data import binarize, load_dataset
from vaexp.errors import VaexpError
from vaexp.estimators import Estimator, get_estimator, surrogate_losses
from vaexp.models import build_model
from vaexp.objectives import Objective, make_objective
from vaexp.runtime import resolve_device
from vaexp.schema import TrainConfig
from vaexp.tblog import RunLogger

CSV_NAME = "snr.csv"
PNG_NAME = "snr.png"
THETA, PHI = "theta", "phi"
ALL = "all"  # θ's row: the same gradient for every estimator
# Per vectorised pass: elements of the widest activation (draws × M × K × B × width) and of the
# per-draw gradients (draws × (P_θ + estimators × P_φ), copied to fp64 for the moments). Each
# ~16-64 MB in fp32; a pass of tiny draws is cheap, so this costs little speed on small models.
_CHUNK_ELEMENTS = 1 << 22
_GRAD_ELEMENTS = 1 << 23
_FLOOR = math.sqrt(2 / math.pi)  # E|Z| for Z ~ N(0, 1): the SNR of a zero-mean gradient is ≈ this / √R


# -- one vectorised pass of gradient draws -------------------------------------------------------

class _LogWeightsModule(nn.Module):
    """model.log_weights as a forward, so torch.func.functional_call can swap the parameters."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, m: int, k: int, need_bar: bool, generator: Optional[torch.Generator]):
        return self.model.log_weights(x, m, k, need_bar=need_bar, generator=generator)


def _flat(grads: Dict[str, Tensor]) -> Tensor:
    return torch.cat([g.reshape(-1) for g in grads.values()])


class GradientSampler:
    """Independent gradient draws at the model's current parameters for a fixed minibatch x."""

    def __init__(self, model: nn.Module, x: Tensor, objective: Objective, estimators: Sequence[Estimator]):
        self.wrapped = _LogWeightsModule(model)
        self.x, self.objective, self.estimators = x, objective, list(estimators)
        theta_ids = {id(p) for p in model.theta_parameters()}
        phi_ids = {id(p) for p in model.phi_parameters()}
        named = dict(self.wrapped.named_parameters())
        self.theta = {n: p.detach() for n, p in named.items() if id(p) in theta_ids}
        self.phi = {n: p.detach() for n, p in named.items() if id(p) in phi_ids}
        self.need_bar = any(e.needs_lw_bar for e in self.estimators)

    @property
    def sizes(self) -> Tuple[int, int]:
        return sum(p.numel() for p in self.theta.values()), sum(p.numel() for p in self.phi.values())

    def draw(self, m: int, k: int, n: int, generator: torch.Generator) -> Tuple[Tensor, List[Tensor]]:
        """n draws: θ gradients [n, P_θ] and, per estimator, φ gradients [n, P_φ] (of the losses,
        i.e. minus the bounds, as the trainer's optimiser sees them)."""
        x, obj, ests = self.x, self.objective, self.estimators

        def losses(theta, phi):
            lws = functional_call(self.wrapped, {**theta, **phi}, (x, m, k, self.need_bar, generator))
            per_est = [surrogate_losses(obj, est, lws.lw, lws.lw_bar) for est in ests]
            # θ's surrogate does not depend on the estimator: take it once.
            return (per_est[0].theta_loss,) + tuple(loss.phi_loss for loss in per_est)

        def one_draw(_):
            outs, pull = vjp(losses, self.theta, self.phi)

            def cotangent(i):
                return tuple(torch.ones_like(o) if j == i else torch.zeros_like(o) for j, o in enumerate(outs))

            g_theta = _flat(pull(cotangent(0))[0])
            g_phi = tuple(_flat(pull(cotangent(i + 1))[1]) for i in range(len(ests)))
            return g_theta, g_phi

        g_theta, g_phi = vmap(one_draw, randomness="different")(torch.arange(n, device=x.device))
        return g_theta, list(g_phi)


class Moments:
    """Running mean and sum of squared deviations per parameter (Chan et al.'s merge, in fp64).

    A chunk's own statistics are taken in the gradients' dtype (two passes, centred, so fp32 is
    accurate to ~1e-6 here) and only the [P] results are merged in fp64: for big models the
    per-draw gradients are most of the memory traffic."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, g: Tensor) -> None:
        n_b, mean_b = g.shape[0], g.mean(0)
        m2_b = ((g - mean_b) ** 2).sum(0).double()
        mean_b = mean_b.double()
        if self.n == 0:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta ** 2 * (self.n * n_b / n)
        self.n = n

    def std(self) -> Tensor:
        return torch.sqrt(self.m2 / (self.n - 1))


def per_parameter_snr(mean: Tensor, std: Tensor) -> Tensor:
    """|mean| / std; NaN where a parameter never gets a gradient (mean = std = 0), +inf where the
    gradient is the same in every draw. Both are left out of the summaries."""
    snr = mean.abs() / std
    return torch.where((std == 0) & (mean == 0), torch.full_like(snr, float("nan")), snr)


def summarise(snr: Tensor) -> Dict[str, float]:
    finite = snr[torch.isfinite(snr)]
    if finite.numel() == 0:
        return {"mean": float("nan"), "median": float("nan"), "params": int(snr.numel()), "excluded": int(snr.numel())}
    return {"mean": float(finite.mean()), "median": float(finite.median()),
            "params": int(snr.numel()), "excluded": int(snr.numel() - finite.numel())}


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


def auto_chunk(model: nn.Module, m: int, k: int, batch: int, draws: int, grad_size: int) -> int:
    """Draws per vectorised pass so the widest activation and the draws' gradients stay within
    the budgets above. Depends only on shapes, so results are the same on every machine."""
    widest = max((max(p.shape) for p in model.parameters() if p.dim() == 2), default=1)
    by_activations = _CHUNK_ELEMENTS // max(1, m * k * batch * widest)
    by_gradients = _GRAD_ELEMENTS // max(1, grad_size)
    return max(1, min(draws, by_activations, by_gradients))


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


def measure(sampler: GradientSampler, cells: Sequence[Tuple[int, int]], draws: int, chunk: int, seed: int,
            device: torch.device, progress: bool = False) -> Tuple[List[Row], Dict]:
    """Every cell: R draws in chunks; per-parameter SNR summaries. Also returns the per-parameter
    SNR tensors, keyed (estimator, network, m, k), for tests and further analysis."""
    names = [e.name for e in sampler.estimators]
    model = sampler.wrapped.model
    batch = sampler.x.shape[0]
    grad_size = sampler.sizes[0] + len(names) * sampler.sizes[1]
    plan = [(m, k, chunk or auto_chunk(model, m, k, batch, draws, grad_size)) for m, k in cells]
    bar = _bar(sum(draws * m * k for m, k, _ in plan), progress)
    rows: List[Row] = []
    per_param: Dict[Tuple[str, str, int, int], Tensor] = {}
    for m, k, c in plan:
        gen = torch.Generator(device=device).manual_seed(cell_seed(seed, m, k))
        theta = Moments()
        phi = [Moments() for _ in names]
        done = 0
        while done < draws:
            n = min(c, draws - done)
            with torch.no_grad():  # torch.func does its own differentiation; no outer graph is kept
                g_theta, g_phis = sampler.draw(m, k, n, gen)
            theta.add(g_theta)
            for mom, g in zip(phi, g_phis):
                mom.add(g)
            done += n
            if bar is not None:
                bar.set_description(f"snr M={m} K={k}", refresh=False)
                bar.update(n * m * k)
        for est, net, mom in [(ALL, THETA, theta)] + [(e, PHI, mom) for e, mom in zip(names, phi)]:
            snr = per_parameter_snr(mom.mean, mom.std()).cpu()
            per_param[(est, net, m, k)] = snr
            s = summarise(snr)
            rows.append(Row(est, net, m, k, draws, s["mean"], s["median"], s["params"], s["excluded"]))
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

def load_point(cfg, device: torch.device):
    """(model, data, description): a trained run's checkpoint, or the analytic model at its optimum
    for the training data plus N(0, perturb²) on every parameter (Rainforth et al.)."""
    if cfg.run:
        run = Path(cfg.run)
        saved = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(run / rundir.CONFIG))
        data = load_dataset(saved.dataset, device)
        model = build_model(saved.model, data).to(device)
        state = rundir.load_checkpoint(run, map_location=device)
        model.load_state_dict(state["model"])
        where = (f"run {run} (epoch {state['state']['epoch']}, step {state['state']['global_step']}; "
                 f"{saved.dataset.name}, {saved.model.name})")
        return model, data, where
    data = load_dataset(cfg.dataset, device)
    model = build_model(cfg.model, data).to(device)
    model.set_optimum(data.train)
    model.perturb(cfg.perturb, torch.Generator(device=device).manual_seed(cfg.seed))
    where = (f"the analytic model (D={data.train.shape[1]}, {len(model.encoder)} stochastic layer(s), "
             f"q_var={cfg.model.q_var:.4g}) at its optimum for the {data.train.shape[0]} training points, "
             f"perturbed by N(0, {cfg.perturb}^2) (seed {cfg.seed})")
    return model, data, where


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
    """`vaexp snr`: measure, then write snr.csv, snr.png, TensorBoard scalars and config.yaml."""
    device = resolve_device(cfg.device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)),
                   out_dir / "config.yaml")
    model, data, where = load_point(cfg, device)
    model.eval()
    x = minibatch(data, cfg.index, cfg.batch, cfg.seed)
    obj = make_objective(cfg.objective.name, cfg.beta)
    ests = [get_estimator(e) for e in dict.fromkeys(cfg.estimators)]
    sampler = GradientSampler(model, x, obj, ests)
    cells = grid_cells(cfg.k, cfg.m, cfg.grid)
    t0 = time.perf_counter()
    rows, _ = measure(sampler, cells, cfg.draws, cfg.chunk, cfg.seed, device, cfg.progress)
    elapsed = time.perf_counter() - t0
    slopes = {s: fit_slopes(rows, s) for s in ("mean", "median")}
    header = (f"gradient SNR = |mean| / std per parameter over R={cfg.draws} draws, objective={cfg.objective.name} "
              f"(M outside the log, K inside), a fixed minibatch of {cfg.batch} training point(s) from index "
              f"{cfg.index};\nat {where}.\n"
              f"P_theta={sampler.sizes[0]}, P_phi={sampler.sizes[1]}; a zero-mean gradient reads "
              f"~{noise_floor(cfg.draws):.3g} (0.8/sqrt(R)); '*' marks summaries below 3x that. {elapsed:.0f} s.")
    table = header + "\n\n" + "\n\n".join(format_table(rows, slopes[s], s, cfg.draws) for s in ("mean", "median"))
    write_csv(out_dir / CSV_NAME, rows)
    write_tensorboard(out_dir, rows, slopes)
    plot(out_dir / PNG_NAME, rows, cfg.draws, title=f"{cfg.objective.name}: gradient SNR, R={cfg.draws}")
    (out_dir / "snr.txt").write_text(table + "\n")
    return {"rows": rows, "slopes": slopes, "table": table, "out_dir": out_dir, "elapsed_s": elapsed}


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


def _fmt_slope(v: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:+.2f}"


def write_csv(path: Path, rows: Sequence[Row]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["estimator", "network", "m", "k", "draws", "snr_mean", "snr_median", "params", "excluded"])
        for r in rows:
            w.writerow([r.estimator, r.network, r.m, r.k, r.draws, repr(r.mean), repr(r.median), r.params, r.excluded])


def write_tensorboard(out_dir: Path, rows: Sequence[Row], slopes: Dict) -> None:
    """snr_vs_k/<net>_<estimator>/<summary>_m<M> at step K, snr_vs_m/... at step M, and the slopes."""
    log = RunLogger(out_dir)
    for r in rows:
        for s in ("mean", "median"):
            v = getattr(r, s)
            log.scalars({f"snr_vs_k/{r.network}_{r.estimator}/{s}_m{r.m}": v}, r.k)
            log.scalars({f"snr_vs_m/{r.network}_{r.estimator}/{s}_k{r.k}": v}, r.m)
    for s, by_key in slopes.items():
        for (est, net), (s_k, s_m) in by_key.items():
            log.scalars({f"slope_k/{net}_{est}/{s}": s_k, f"slope_m/{net}_{est}/{s}": s_m}, 0)
    log.close()


_COLOURS = {ALL: "black", "reparam": "tab:blue", "stl": "tab:orange", "dreg": "tab:green"}


def plot(path: Path, rows: Sequence[Row], draws: int, title: str = "") -> None:
    """Log–log: SNR vs K (at M = m[0]) and, when M varies, SNR vs M (at K = k[0]); one line per
    estimator and network (mean over parameters solid, median dashed); the estimation floor dotted."""
    import matplotlib

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
        ax.set_xlabel(f"{axis} ({fixed})")
        ax.set_ylabel("gradient SNR (over parameters)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="sample", unit_scale=True, dynamic_ncols=True, desc="snr", leave=False)
