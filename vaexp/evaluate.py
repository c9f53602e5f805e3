"""Test log-likelihood with K importance samples, L_k bounds, active units.

log p(x) ≈ logmeanexp_{k≤K} lw_k with lw from the model's own q (docs/DESIGN.md). Log-weights are
computed in fp32 in chunks of examples × samples that fit memory; the log-sum-exp and every
sum over examples run in fp64. Seeds are fixed, so two evaluations of a model agree exactly.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from vaexp import rundir, runtime, surgery
from vaexp.data import load_dataset
from vaexp.data.base import digests
from vaexp.errors import VaexpError, memory_hint
from vaexp.models import build_model
from vaexp.models import likelihood
from vaexp.models.burda import VAE
from vaexp.objectives import make_objective
from vaexp.runtime import resolve_device
from vaexp.schema import TrainConfig
from vaexp import tblog
from vaexp.tblog import RunLogger, eval_card, hparam_metrics

# Log-weight rows (samples x examples) per block when eval.chunk = 0. It is a constant, not a
# function of free memory: the ε of each block come from a generator re-seeded per block, so the
# numbers depend only on (eval.seed, eval.k, eval.chunk), never on the machine's memory.
DEFAULT_ROWS = 1 << 16
# An image whose normalised importance weights have an effective sample size below this is
# counted in ess_below_10: its K-sample estimate rests on a handful of samples.
LOW_ESS = 10
# Rows per forward pass on a CPU: the draws stay in DEFAULT_ROWS blocks, the passes slice them
# (2-core measurement: ~3x faster per example than passes of 65,536 rows, whose 200 MB
# temporaries are page-faulted afresh on every allocation).
CPU_PASS_ROWS = 4096
# The compiled forward pass (_Pass) from this many log-weight rows (examples x K) per evaluation: it
# saves ~0.5 ms per image at K = 5000 (~7%) and its compilation costs ~2 s more than the likelihood
# kernels' alone with an empty compiler cache (~0.5 s with a warm one; Zen 5 VM, 2 threads), so
# from ~3,400 images at K = 5000 (the whole test set, not the small evaluations during training).
COMPILE_MIN_ROWS = 1 << 24


def block_seed(seed: int, block: int) -> int:
    return (seed * 1_000_003 + block * 7_919 + 11) % (2 ** 63)


@contextlib.contextmanager
def no_tf32():
    """Full fp32 matmuls for evaluation: TF32 would move the NLL in the 3rd decimal. Through the
    fp32_precision settings where torch has them (reading the legacy allow_tf32 flags after a user
    set the new ones is an error), else the allow_tf32 flags."""
    backends = (torch.backends.cuda.matmul, torch.backends.cudnn)
    name, full = ("fp32_precision", "ieee") if all(hasattr(b, "fp32_precision") for b in backends) \
        else ("allow_tf32", False)
    old = [getattr(b, name) for b in backends]
    for b in backends:
        setattr(b, name, full)
    try:
        yield
    finally:
        for b, value in zip(backends, old):
            setattr(b, name, value)


@torch.no_grad()
def log_likelihoods(model: VAE, x: Tensor, k: int, report_k: List[int], rows: int,
                    seed: int, progress: bool = False, pass_rows: Optional[int] = None) -> Dict[str, Tensor]:
    """Per-example fp64 estimates: 'log_px' = L_K, and 'L{kk}' for kk in report_k.

    L_kk is averaged over the floor(K/kk) disjoint groups of the same K samples (for kk = 1,
    the ELBO averaged over all K samples). Examples go in draw blocks of ~`rows` sample rows,
    each block with its own generator seeded from (seed, block index): a block's estimates do not
    depend on how many examples are evaluated after it, nor on the device's free memory.

    `pass_rows` sizes the forward passes, separately from the draws: None runs one pass per
    block piece (ε drawn inside log_weights); otherwise each block's ε are drawn exactly as that
    pass would draw them and handed to log_weights explicitly, in passes of about `pass_rows`
    rows: several whole blocks per pass on a GPU with memory to spare, slices of a block on a
    CPU (where passes of a few thousand rows avoid page-faulting huge temporaries). The draws,
    so the estimates, are the same for every pass_rows (up to float rounding in the matmuls).
    """
    generator = torch.Generator(device=x.device)
    n = x.shape[0]
    per_piece = min(k, rows)                  # samples per draw piece
    examples = max(1, rows // per_piece)      # examples per draw block
    # A block's K log-weights per example are held whole (fp32 pieces, their concatenation, then
    # fp64: 16 bytes a row at the peak); past the free memory Linux's out-of-memory killer would
    # end the process with no word.
    need, free = k * min(n, examples) * 16, runtime.free_memory(x.device)
    if free is not None and need > free:
        raise VaexpError(f"eval.k={k}: the evaluation holds the K log-weights of each image in a block together, "
                         f"{need / 2 ** 30:.1f} GiB here, more than the {free / 2 ** 30:.1f} GiB free on "
                         f"{x.device.type}; lower eval.k")
    out = {key: torch.empty(n, dtype=torch.float64, device=x.device) for key in ("log_px", "ess", "max_weight")}
    for kk in report_k:
        out[f"L{kk}"] = torch.empty(n, dtype=torch.float64, device=x.device)
    starts = list(range(0, n, examples))
    # Whole blocks per forward pass (only when a block holds all K samples of its examples).
    per_pass = max(1, pass_rows // (examples * k)) if pass_rows is not None and per_piece == k else 1
    bar = _bar(n, progress)
    # per forward-pass group: its draw blocks (block, first example, end)
    passes = [[(b, starts[b], min(n, starts[b] + examples)) for b in range(first, min(first + per_pass, len(starts)))]
              for first in range(0, len(starts), per_pass)]
    if pass_rows is not None:
        run_pass = _Pass(model, x.device, n * k)
        latents, dtype = list(model.latents), next(model.parameters()).dtype
    for blocks in passes:
        runtime.adapt_threads()  # the thread governor's count, applied between passes
        start, stop = blocks[0][1], blocks[-1][2]
        xb = x[start:stop]
        if pass_rows is None:
            generator.manual_seed(block_seed(seed, blocks[0][0]))
            lw = torch.cat([model.log_weights(xb, 1, min(per_piece, k - s), generator=generator).lw[0]
                            for s in range(0, k, per_piece)])
        else:
            pieces = _draw_blocks(x, latents, dtype, blocks, k, per_piece, seed, generator)
            lw = torch.cat([_passes(run_pass, xb, kp, eps, pass_rows) for kp, eps in pieces])
        lw = lw.double()  # [K, examples of these blocks]
        out["log_px"][start:stop] = torch.logsumexp(lw, 0) - math.log(k)
        out["ess"][start:stop], out["max_weight"][start:stop] = weight_diagnostics(lw)
        for kk in report_k:
            groups = k // kk
            g = lw[: groups * kk].reshape(groups, kk, -1)
            out[f"L{kk}"][start:stop] = (torch.logsumexp(g, 1) - math.log(kk)).mean(0)
        if bar is not None:
            bar.update(stop - start)
    if bar is not None:
        bar.close()
    return out


def weight_diagnostics(lw: Tensor) -> Tuple[Tensor, Tensor]:
    """Per example of lw [K, n] (fp64): the effective sample size of the normalised weights,
    ESS = 1 / Σ w̃² = exp(2·logsumexp(lw) − logsumexp(2·lw)) (K for equal weights, 1 when one
    dominates), and the largest normalised weight max w̃. A K-sample estimate whose ESS is a few
    samples rests on those few: it is unreliable however large K is."""
    lse = torch.logsumexp(lw, 0)
    return torch.exp(2 * lse - torch.logsumexp(2 * lw, 0)), torch.exp(lw.max(0).values - lse)


def weight_summary(ess: Tensor, max_weight: Tensor) -> Dict[str, float]:
    """vaexp.rundir.WEIGHT_KEYS over the evaluated images (ess_below_10: the fraction with ESS < LOW_ESS)."""
    values = (ess.mean(), ess.median(), (ess < LOW_ESS).double().mean(), max_weight.mean(), max_weight.median())
    return {key: float(v) for key, v in zip(rundir.WEIGHT_KEYS, values)}


# -- the forward pass: compiled on a CPU ----------------------------------------------------------

def _eager_pass(model, xb: Tensor, kp: int, eps: List[Tensor]) -> Tensor:
    return model.log_weights(xb, 1, kp, eps=eps).lw[0]


_compiled_pass: Dict[str, object] = {}  # "fn" -> the compiled pass, or False once it has failed


class _Pass:
    """lw [kp, b] of examples xb with the given ε. On a CPU, for Burda's VAE, in an evaluation of at
    least COMPILE_MIN_ROWS rows, where torch.compile works: one compiled graph (the GEMMs are
    dense.py's oneDNN op; the sampling, log q, log p(z) and the likelihood, one log per lane, fuse
    into a few loops around them; eagerly those are ~20 small ops a pass), its first call in each
    evaluation checked against the eager pass on the same ε; the eager pass elsewhere (on CUDA it
    has not been measured), after a failure (with one warning) and with VAEXP_COMPILE=0 or the
    likelihood's plain mode (the benchmark's 'today')."""

    def __init__(self, model, device: torch.device, rows: int):
        self.model, self.checked = model, False
        self.fn = None
        if (device.type == "cpu" and isinstance(model, VAE) and rows >= COMPILE_MIN_ROWS
                and runtime.compiling() and likelihood.get_mode() != "plain"
                and _compiled_pass.get("fn") is not False):
            if "fn" not in _compiled_pass:
                _compiled_pass["fn"] = runtime.compile(_eager_pass, dynamic=True, fullgraph=True)
            self.fn = _compiled_pass["fn"]

    def __call__(self, xb: Tensor, kp: int, eps: List[Tensor]) -> Tensor:
        if self.fn is not None:
            try:
                lw = self.fn(self.model, xb, kp, eps)
                if not self.checked:
                    ref = _eager_pass(self.model, xb, kp, eps)
                    # sums of ~D terms each, in fp32: rounding ~1e-6 relative to the row's magnitude
                    if lw.shape != ref.shape or not bool(((lw - ref).abs() <= 1e-4 * (1 + ref.abs())).all()):
                        raise RuntimeError("its log-weights differ from the eager pass's")
                    self.checked = True
                return lw
            except Exception as err:  # noqa: BLE001 - any failure: the eager pass from now on
                _compiled_pass["fn"], self.fn = False, None
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                warnings.warn(f"vaexp: the compiled evaluation pass does not work ({type(err).__name__}: "
                              f"{first[:200]}); using the eager pass (same values up to float rounding)",
                              RuntimeWarning, stacklevel=2)
        return _eager_pass(self.model, xb, kp, eps)


# -- the draws ---------------------------------------------------------------------------------------

def _draw_blocks(x: Tensor, latents: List[int], dtype: torch.dtype, blocks, k: int, per_piece: int, seed: int,
                 generator: torch.Generator):
    """The ε of consecutive draw blocks (block, start, stop), per block and per piece in the order
    log_weights draws them: [(k_p, [ε per layer, [1, k_p, examples of the blocks, D]])] per piece."""
    pieces = []  # per piece of samples: (k_p, [eps per layer, per block])
    for block, start, stop in blocks:
        generator.manual_seed(block_seed(seed, block))
        for p, s in enumerate(range(0, k, per_piece)):
            kp = min(per_piece, k - s)
            eps = [torch.randn((1, kp, stop - start, d), generator=generator, device=x.device, dtype=dtype)
                   for d in latents]
            if len(pieces) <= p:
                pieces.append((kp, [eps]))
            else:
                pieces[p][1].append(eps)
    return [(kp, per_block[0] if len(per_block) == 1 else
             [torch.cat([e[i] for e in per_block], dim=2) for i in range(len(latents))]) for kp, per_block in pieces]


def _passes(run_pass, xb: Tensor, kp: int, eps: List[Tensor], pass_rows: int) -> Tensor:
    """lw [kp, b] for examples xb with the given ε, in forward passes of at most pass_rows rows
    (a piece of more samples than that in equal parts: no small remainder pass)."""
    b = xb.shape[0]
    if kp * b <= pass_rows:
        return run_pass(xb, kp, eps)
    if kp <= pass_rows:  # whole examples per pass
        step = max(1, pass_rows // kp)
        return torch.cat([run_pass(xb[e:e + step], kp, [v[:, :, e:e + step] for v in eps])
                          for e in range(0, b, step)], dim=1)
    size = -(-kp // -(-kp // pass_rows))
    return torch.cat([torch.cat([run_pass(xb[e:e + 1], min(size, kp - s), [v[:, s:s + size, e:e + 1] for v in eps])
                                 for s in range(0, kp, size)]) for e in range(b)], dim=1)


def pass_rows_for(model, device: torch.device, k: int) -> Optional[int]:
    """Rows per forward pass of the evaluation on this device (see log_likelihoods): on a CPU a
    few thousand (large temporaries cost more in page faults than they save); on CUDA as many
    as a quarter of the free memory holds (whole draw blocks), by a rough bytes-per-row bound."""
    device = torch.device(device)
    if device.type == "cpu":
        return CPU_PASS_ROWS
    if device.type != "cuda":
        return None
    widths = sum(p.shape[0] for p in model.parameters() if p.dim() == 2) + 4 * getattr(model, "x_dim", 0)
    bytes_per_row = 16 * max(widths, 1)
    free, _ = torch.cuda.mem_get_info(device)
    return max(DEFAULT_ROWS, int(free // 4 // bytes_per_row))


@torch.no_grad()
def active_units(model: VAE, x: Tensor, threshold: float, samples: int, generator: torch.Generator,
                 batch: int = 500) -> List[Dict[str, float]]:
    """Per stochastic layer: units with Cov_x(E_q[z_u|x]) > threshold (Burda et al.)."""
    means: List[List[Tensor]] = [[] for _ in model.encoder]
    for start in range(0, x.shape[0], batch):
        for i, mu in enumerate(model.posterior_means(x[start:start + batch], samples, generator)):
            means[i].append(mu.double())
    result = []
    for layer_means in means:
        var = torch.cat(layer_means).var(0, unbiased=True)
        result.append({"active": int((var > threshold).sum()), "units": int(var.numel()),
                       "variances": [float(v) for v in var.cpu()]})
    return result


def check_test_size(cfg, n_available: int, dataset: str) -> None:
    """eval.n_test larger than the test set would evaluate fewer images than the config says it did."""
    if cfg.n_test is not None and cfg.n_test > n_available:
        raise VaexpError(f"eval.n_test={cfg.n_test}: the test set of dataset={dataset} has {n_available} images; "
                         f"use eval.n_test=null (all of them) or at most {n_available}")


def evaluate(model: VAE, x_test: Tensor, cfg, device: torch.device, progress: bool = False) -> Dict:
    """Everything a run reports about the test set, as plain numbers (and per-example tensors)."""
    was_training = model.training
    model.eval()
    x = x_test if cfg.n_test is None else x_test[: cfg.n_test]
    rows = cfg.chunk * cfg.k if cfg.chunk > 0 else DEFAULT_ROWS
    report_k = sorted(set(int(v) for v in cfg.report_k if v < cfg.k))
    with no_tf32():
        ll = log_likelihoods(model, x, cfg.k, report_k, rows, cfg.seed, progress,
                             pass_rows=pass_rows_for(model, device, cfg.k))
        au = active_units(model, x, cfg.au_threshold, cfg.au_samples,
                          torch.Generator(device=device).manual_seed(cfg.seed + 1))
        surgery = _surgery(model, x, cfg, device)
    model.train(was_training)
    n = x.shape[0]
    log_px = ll["log_px"]
    metrics = {
        "k": cfg.k,
        "n_test": n,
        "nll": float(-log_px.mean()),
        "nll_stderr": float(log_px.std() / math.sqrt(n)) if n > 1 else float("nan"),
        f"L{cfg.k}": float(log_px.mean()),
    }
    for kk in report_k:
        metrics[f"L{kk}"] = float(ll[f"L{kk}"].mean())
    metrics.update(weight_summary(ll["ess"], ll["max_weight"]))
    metrics["active_units"] = [layer["active"] for layer in au]
    metrics["latent_units"] = [layer["units"] for layer in au]
    metrics["unit_variances"] = [layer["variances"] for layer in au]
    metrics.update(surgery)
    metrics["test_images"] = test_images_digest(x)
    return {"metrics": metrics, "per_example": {key: v.cpu() for key, v in ll.items()}}


def test_images_digest(x: Tensor) -> str:
    """sha256 of the evaluated (binarised) test images as bytes: runs scored the same images iff
    they agree (vaexp compare pairs only those; settings alone miss another copy of the data)."""
    return digests({"test": x.detach().to(device="cpu", dtype=torch.uint8).numpy()})["test"]


def _surgery(model: VAE, x: Tensor, cfg, device: torch.device) -> Dict:
    """ELBO surgery (vaexp.surgery) on the first eval.surgery_n images; {} when off or when the
    model is not a Bernoulli VAE with a N(0, I) prior."""
    n = int(getattr(cfg, "surgery_n", 0) or 0)
    if n <= 0 or not surgery.supported(model):
        return {}
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 2)
    return surgery.elbo_surgery(model, x[:n], int(getattr(cfg, "surgery_samples", 10)), gen)


def curve_point(metrics: Dict, epoch: int, step: int) -> Dict:
    """An evaluation during training as a point of the run's NLL curve (vaexp.rundir.record_curve_point)."""
    keep = ("nll", "nll_stderr", "k", "n_test", "ess_mean")
    point = {"epoch": epoch, "step": step, **{key: metrics[key] for key in keep if key in metrics}}
    point.update({key: metrics[key] for key in rundir.lk_keys(metrics)})
    return point


def format_table(metrics: Dict) -> str:
    """A short human-readable table of the test metrics."""
    k = metrics["k"]
    stderr = metrics.get("nll_stderr")  # null in metrics.json for a single image
    spread = f" ± {stderr:.3f}" if stderr is not None and math.isfinite(stderr) else ""
    rows = [("test NLL", f"{metrics['nll']:.3f}{spread}  (K={k}, {metrics['n_test']} images)")]
    for key in rundir.lk_keys(metrics):
        rows.append((key, f"{metrics[key]:.3f}"))
    if "ess_mean" in metrics:  # evaluations from before the diagnostics have none
        rows.append(("IS weights", f"ESS mean {metrics['ess_mean']:.1f}, median {metrics['ess_median']:.1f} of K={k}; "
                                f"{100 * metrics['ess_below_10']:.1f}% of images below {LOW_ESS}; "
                                f"max weight mean {metrics['max_weight_mean']:.3f}"))
    au = ", ".join(f"{a}/{u}" for a, u in zip(metrics["active_units"], metrics["latent_units"]))
    rows.append(("active units", au + "  (per stochastic layer)"))
    if "avg_kl" in metrics:
        rows.append(("ELBO surgery", f"recon {metrics['recon']:.3f}, avg KL {metrics['avg_kl']:.3f} = I(x;z) "
                                     f"{metrics['mutual_info']:.3f} (<= log N = {metrics['mutual_info_max']:.2f}) + "
                                     f"KL(q(z)||p(z)) {metrics['marginal_kl']:.3f}  (N={metrics['surgery_n']})"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="eval", unit="img", leave=False, dynamic_ncols=True)


def memory_hint_for(settings):
    """Memory exhaustion inside the block -> a VaexpError naming the eval settings to lower."""
    rows = settings.chunk * settings.k if settings.chunk > 0 else DEFAULT_ROWS
    return memory_hint(f"while evaluating with eval.k={settings.k}, eval.chunk={settings.chunk} ({rows} log-weight "
                       f"rows per block)", "eval.chunk (eval.chunk=0 sizes blocks automatically) or eval.k")


def evaluate_run(run_dir: Path, settings, device_name, progress: bool = False) -> Dict:
    """`vaexp eval`: evaluate a saved run's checkpoint with `settings` (an EvalConf), add the result
    to its metrics.json (with the settings and the checkpoint's position; its per-image values to
    a new file) and to TensorBoard: reeval/* scalars, a TEXT card, and the HPARAMS table's metrics
    (written after the earlier ones at the same step, so the table shows this evaluation). Holds
    the run directory's lock throughout."""
    run_dir = Path(run_dir)
    with rundir.locked(run_dir):
        saved_cfg = rundir.load_config(run_dir, TrainConfig)
        device = resolve_device(device_name)
        runtime.hold_threads_for(device)
        state = rundir.load_checkpoint(run_dir, map_location=device)
        if state is None:
            raise VaexpError(f"run={run_dir}: no checkpoint.pt there (vaexp train writes one at the end of every "
                             f"epoch); train it first")
        rundir.check_checkpoint(state, saved_cfg, run_dir)
        data = load_dataset(saved_cfg.dataset, device)
        check_test_size(settings, data.test.shape[0], saved_cfg.dataset.name)
        model = build_model(saved_cfg.model, data).to(device)
        rundir.restore_model(model, state, run_dir)
        with memory_hint_for(settings):
            result = evaluate(model, data.test, settings, device, progress=progress)
        before, _ = rundir.read_metrics(run_dir)
        diverged = ((before or {}).get("run") or {}).get("state") == "diverged"
        position = state["state"]
        checkpoint = rundir.checkpoint_record(position, rundir.n_epochs(saved_cfg.schedule), diverged)
        after = rundir.record_evaluation(run_dir, result["metrics"], result["per_example"], rundir.as_dict(settings),
                                         checkpoint, by="eval")
        step = position["global_step"]
        train = after.get("train") or rundir.last_trained(position.get("history") or [],
                                                          make_objective(saved_cfg.objective.name).quantity)
        metrics = hparam_metrics(result["metrics"], train)
        log = RunLogger(run_dir)
        log.scalars({f"reeval/{k}": v for k, v in result["metrics"].items() if isinstance(v, (int, float))}
                    | {f"reeval/active_units_{i + 1}": a for i, a in enumerate(result["metrics"]["active_units"])},
                    step)
        log.text("reeval/summary", eval_card(f"vaexp eval, {after['evals'][-1]['time']}: checkpoint of epoch "
                                             f"{position['epoch']}, step {step}", format_table(result["metrics"])), step)
        if "test" in (before or {}):  # the row's metrics replaced; those this evaluation lacks (an
            # L_k of other eval.report_k) become NaN, so the row never mixes two evaluations
            try:
                shown = hparam_metrics(before["test"], before.get("train"))
            except (KeyError, TypeError, ValueError):  # a record from an older vaexp without some of them
                shown = {}
            metrics = {**metrics, **{k: float("nan") for k in shown if k not in metrics}}
        values, differs = tblog.hparams(saved_cfg, tblog.varied_keys(run_dir))
        log.hparams(values, differs, metrics, step)  # (again for a run trained to its evaluation: columns for new L_k)
        log.close()
    return {"metrics": result["metrics"], "epoch": position["epoch"], "step": step}
