"""Independent gradient draws at fixed parameters, vectorised, and their statistics.

What `vaexp snr` (vaexp.snr) and the training diagnostics (vaexp.training.diagnostics) both
measure. Invariants: θ's and each estimator's φ gradient come from
vaexp.estimators.surrogate_losses (the trainer's own losses); the n draws of a pass are one
torch.func.vmap with randomness='different' from one generator, and every estimator sees the same
draw (common random numbers), so θ is drawn once and paired differences est − reparam are exact
pairs; moments are merged in fp64 (Chan et al.). Statistics per network (θ, or φ of one
estimator): the mean over parameters of the per-parameter variance; SNR = |mean|/std per
parameter (summarised by mean and median over parameters) and dreg_estimators' ratio of averages
√(mean_p mean² / mean_p var); the bias statistic z = √S, S = R‖mean d‖²/tr Σ̂_d of the paired
differences d = est − reparam: under E[d] = 0 S is a weighted mean of χ²₁ variables (E S = 1,
P(S > 16) ≤ 6e-5; tests/test_gaussian.py), a bias b shows as z ≈ √R‖b‖/√tr Σ_d.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from vaexp.estimators import Estimator, surrogate_losses
from vaexp.objectives import Objective

# Per vectorised pass: elements of the widest activation (draws × M × K × B × width) and of the
# per-draw gradients (draws × (1 + estimators) × (P_θ + P_φ), copied to fp64 for the moments). Each
# ~16-64 MB in fp32; a pass of tiny draws is cheap, so this costs little speed on small models.
_CHUNK_ELEMENTS = 1 << 22
_GRAD_ELEMENTS = 1 << 23


class _LogWeightsModule(nn.Module):
    """model.log_weights as a forward, so torch.func.functional_call can swap the parameters."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, m: int, k: int, need_bar: bool, need_score: bool,
                generator: Optional[torch.Generator]):
        return self.model.log_weights(x, m, k, need_bar=need_bar, generator=generator, need_score=need_score)


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
        self.need_score = any(e.needs_score for e in self.estimators)

    @property
    def sizes(self) -> Tuple[int, int]:
        return sum(p.numel() for p in self.theta.values()), sum(p.numel() for p in self.phi.values())

    def draw(self, m: int, k: int, n: int, generator: torch.Generator) -> Tuple[Tensor, List[Tensor]]:
        """n draws: θ gradients [n, P_θ] and, per estimator, φ gradients [n, P_φ] (of the losses,
        i.e. minus the bounds, as the trainer's optimiser sees them)."""
        x, obj, ests = self.x, self.objective, self.estimators

        def losses(theta, phi):
            lws = functional_call(self.wrapped, {**theta, **phi}, (x, m, k, self.need_bar, self.need_score, generator))
            per_est = [surrogate_losses(obj, est, lws.lw, lws.lw_bar, lws.log_q_score) for est in ests]
            # θ's surrogate does not depend on the estimator: take it once.
            return torch.stack((per_est[0].theta_loss,) + tuple(loss.phi_loss for loss in per_est))

        def one_draw(_):
            outs, pull = vjp(losses, self.theta, self.phi)
            # every loss's vector-Jacobian product in one batched backward (one-hot cotangents):
            # ~1.5x faster than one backward per loss on burda1
            g_theta, g_phi = vmap(pull)(torch.eye(outs.shape[0], dtype=outs.dtype, device=outs.device))
            return (torch.cat([g[0].reshape(-1) for g in g_theta.values()]),
                    tuple(torch.cat([g[i + 1].reshape(-1) for g in g_phi.values()]) for i in range(len(ests))))

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

    def var(self) -> Tensor:
        return self.m2 / (self.n - 1)

    def std(self) -> Tensor:
        return torch.sqrt(self.var())


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


def snr_ratio_of_averages(mom: Moments) -> float:
    """√(mean_p mean² / mean_p var): dreg_estimators' SNR (it logs the square)."""
    return math.sqrt(float((mom.mean ** 2).mean() / mom.var().mean()))


def bias_z(diff: Moments) -> float:
    """√S, S = R‖mean d‖² / tr Σ̂_d for paired differences d (see the module docstring)."""
    return math.sqrt(float(diff.n * (diff.mean ** 2).sum() / diff.var().sum()))


def auto_chunk(model: nn.Module, m: int, k: int, batch: int, draws: int, grad_size: int) -> int:
    """Draws per vectorised pass so the widest activation and the draws' gradients stay within
    the budgets above. Depends only on shapes, so results are the same on every machine."""
    widest = max((max(p.shape) for p in model.parameters() if p.dim() == 2), default=1)
    by_activations = _CHUNK_ELEMENTS // max(1, m * k * batch * widest)
    by_gradients = _GRAD_ELEMENTS // max(1, grad_size)
    return max(1, min(draws, by_activations, by_gradients))


def draw_moments(sampler: GradientSampler, m: int, k: int, draws: int, chunk: int, generator: torch.Generator,
                 reference: Optional[int] = None, progress=None
                 ) -> Tuple[Moments, List[Moments], List[Optional[Moments]]]:
    """R = `draws` draws in passes of `chunk` (0: auto_chunk): moments of θ, of each estimator's φ
    and, with `reference` (an index into sampler.estimators), of each φ minus the reference's φ
    (None for the reference itself). progress(n) is called after each pass."""
    n_est = len(sampler.estimators)
    if not chunk:  # the batched backward holds θ and φ gradients of every loss (θ's and each φ's)
        grad_size = (1 + n_est) * (sampler.sizes[0] + sampler.sizes[1])
        chunk = auto_chunk(sampler.wrapped.model, m, k, sampler.x.shape[0], draws, grad_size)
    theta, phi = Moments(), [Moments() for _ in range(n_est)]
    diff: List[Optional[Moments]] = [None if reference is None or i == reference else Moments() for i in range(n_est)]
    done = 0
    while done < draws:
        n = min(chunk, draws - done)
        with torch.no_grad():  # torch.func does its own differentiation; no outer graph is kept
            g_theta, g_phis = sampler.draw(m, k, n, generator)
        theta.add(g_theta)
        for mom, g in zip(phi, g_phis):
            mom.add(g)
        for mom, g in zip(diff, g_phis):
            if mom is not None:
                mom.add(g - g_phis[reference])
        done += n
        if progress is not None:
            progress(n)
    return theta, phi, diff
