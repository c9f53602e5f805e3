"""Variational bounds as functions of the log-weights lw[M, K, B].

Each objective gives, per example (shape [B]):
  * ``theta(lw)`` - the bound the generative network θ maximises,
  * ``phi(lw)``   - the bound the inference network φ maximises (differs only for piwae),
  * ``dreg_weights(lw)`` - c = g - ∂g_k/∂lw_k for the φ bound, with g = ∂phi/∂lw (docs/DESIGN.md).
    Bounds built from means and log-mean-exps have closed forms: mean over n samples → 1/n,
    logmeanexp over K → w̃², and linear combinations of them (ciwae, jvi) combine linearly.

``theta`` is the value that gets logged: a true bound, never a gradient surrogate (for jvi,
the JVI estimate: not a bound, and named so wherever it is logged, see ``quantity``).
``phi_terms(K, device, dtype)``: the φ bound as log-mean-exp terms per M group (LmeTerms), for the
estimators that need importance-weight groups (rws family, vimco); None when the bound has a
plain mean of log-weights in it (vae, ciwae). ``convex``: every coefficient is >= 0.
All reductions over samples use max-subtracted log-sum-exp, so lw ≈ -1000 is fine in fp32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional

import torch
from torch import Tensor

from vaexp.rundir import quantity_key


def logmeanexp(x: Tensor, dim) -> Tensor:
    """log(mean(exp(x))) over `dim` (an int or tuple), stable for very negative x."""
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    n = math.prod([x.shape[d] for d in dims])  # a list, not a generator: torch.compile traces it
    return torch.logsumexp(x, dim=dims) - math.log(n)


def _normalised_weights(lw: Tensor, dim) -> Tensor:
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    return torch.exp(lw - torch.logsumexp(lw, dim=dims, keepdim=True))


# -- the three building blocks: value and DReG weights -------------------------------------------

def vae_bound(lw: Tensor) -> Tensor:
    """Mean of all M·K log-weights: the (M·K-sample) ELBO."""
    return lw.mean(dim=(0, 1))


def vae_dreg(lw: Tensor) -> Tensor:
    return torch.full_like(lw, 1.0 / (lw.shape[0] * lw.shape[1]))


def miwae_bound(lw: Tensor) -> Tensor:
    """Mean over M of logmeanexp over K (iwae when M = 1)."""
    return logmeanexp(lw, dim=1).mean(dim=0)


def miwae_dreg(lw: Tensor) -> Tensor:
    return _normalised_weights(lw, 1) ** 2 / lw.shape[0]


def flat_iwae_bound(lw: Tensor) -> Tensor:
    """logmeanexp over all M·K samples (piwae's θ bound)."""
    return logmeanexp(lw, dim=(0, 1))


# -- jackknife variational inference (Nowozin 2018), first order ----------------------------------

def _leave_one_out(lw: Tensor) -> Tensor:
    """[K(j), M, K, B]: lw with sample j of every group left out (-inf), for j = 1..K."""
    k = lw.shape[1]
    eye = torch.eye(k, dtype=torch.bool, device=lw.device).view(k, 1, k, 1)
    return lw.unsqueeze(0).masked_fill(eye, float("-inf"))


def jvi_estimate(lw: Tensor) -> Tensor:
    """Per M group K·L_K − (K−1)·mean_j L_{K−1}^(−j), mean over M; L^(−j) is the logmeanexp
    without sample j. Not a bound: the jackknife removes the O(1/K) bias of L_K (Nowozin 2018).
    K = 1 has no correction term (its weight K − 1 is 0): the estimate is L_1, the ELBO."""
    k = lw.shape[1]
    if k == 1:
        return miwae_bound(lw)
    # [K, M, B]: the logmeanexp over the K − 1 samples left (the -inf entry adds exp(-inf) = 0)
    loo = torch.logsumexp(_leave_one_out(lw), dim=2) - math.log(k - 1)
    return (k * logmeanexp(lw, dim=1) - (k - 1) * loo.mean(0)).mean(0)


def jvi_dreg(lw: Tensor) -> Tensor:
    """c = K·w̃² − (K−1)·mean_j (w̃^(−j))², w̃^(−j) the normalised weights without sample j (0 at j):
    each logmeanexp term contributes its own w̃² on its samples, with the term's coefficient."""
    k = lw.shape[1]
    if k == 1:
        return vae_dreg(lw)
    # softmax subtracts the max before exp: accurate to fp32 rounding of the weights even at
    # |lw| ≈ 1000, which the near-cancellation of the two terms needs
    loo = torch.softmax(_leave_one_out(lw), dim=2)  # [K, M, K, B]
    return (k * torch.softmax(lw, dim=1) ** 2 - (k - 1) * (loo ** 2).mean(0)) / lw.shape[0]


# -- the φ bound as log-mean-exp terms ------------------------------------------------------------

class LmeTerms(NamedTuple):
    """φ bound = mean over the M groups of Σ_g coef[g] · logmeanexp over {k : mask[g, k]}, the same
    terms in every group. What the estimators that work on importance-weight groups read. Built
    on the device by kernels only (no host-to-device copy), so a captured CUDA step can hold it."""

    mask: Tensor  # [G, K] bool
    coef: Tensor  # [G]


def _one_group(k: int, device, dtype=torch.float32) -> LmeTerms:
    return LmeTerms(torch.ones(1, k, dtype=torch.bool, device=device), torch.ones(1, dtype=dtype, device=device))


def _jvi_terms(k: int, device, dtype=torch.float32) -> LmeTerms:
    if k == 1:
        return _one_group(k, device, dtype)
    loo = ~torch.eye(k, dtype=torch.bool, device=device)
    mask = torch.cat([torch.ones(1, k, dtype=torch.bool, device=device), loo])
    coef = torch.cat([torch.full((1,), float(k), dtype=dtype, device=device),
                      torch.full((k,), -(k - 1) / k, dtype=dtype, device=device)])
    return LmeTerms(mask, coef)


# -- the objectives ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Objective:
    name: str
    theta: Callable[[Tensor], Tensor]
    phi: Callable[[Tensor], Tensor]
    dreg_weights: Callable[[Tensor], Tensor]
    phi_terms: Optional[Callable[..., LmeTerms]] = None  # (K, device, dtype) -> LmeTerms
    convex: bool = True
    quantity: str = "bound"  # what `theta` is, in words: logs, metrics and the report use it

    @property
    def slug(self) -> str:
        """The quantity as a key: train/<slug>, epoch/train_<slug>, metrics.json's train.<slug>."""
        return quantity_key(self.quantity)

    @property
    def split(self) -> bool:
        """True when θ and φ maximise different bounds (piwae)."""
        return self.theta is not self.phi


def _ciwae(beta: float) -> Objective:
    b = float(beta)

    def ciwae_bound(lw: Tensor) -> Tensor:
        return b * vae_bound(lw) + (1.0 - b) * miwae_bound(lw)

    def ciwae_dreg(lw: Tensor) -> Tensor:
        return b * vae_dreg(lw) + (1.0 - b) * miwae_dreg(lw)

    return Objective("ciwae", ciwae_bound, ciwae_bound, ciwae_dreg)


# name -> Objective given beta (only ciwae uses it). The one list of objectives: the config
# checks, conf/objective/*.yaml (a test compares them) and every command read it.
OBJECTIVES: Dict[str, Callable[[float], Objective]] = {
    "vae": lambda beta: Objective("vae", vae_bound, vae_bound, vae_dreg),
    "iwae": lambda beta: Objective("iwae", miwae_bound, miwae_bound, miwae_dreg, _one_group),
    "miwae": lambda beta: Objective("miwae", miwae_bound, miwae_bound, miwae_dreg, _one_group),
    "ciwae": _ciwae,
    "piwae": lambda beta: Objective("piwae", flat_iwae_bound, miwae_bound, miwae_dreg, _one_group),
    "jvi": lambda beta: Objective("jvi", jvi_estimate, jvi_estimate, jvi_dreg, _jvi_terms, convex=False,
                                  quantity="JVI estimate"),
}


def make_objective(name: str, beta: float = 0.5) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](beta)
