"""Variational bounds as functions of the log-weights lw[M, K, B].

Each objective gives, per example (shape [B]):
  * ``theta(lw)`` - the bound the generative network θ maximises,
  * ``phi(lw)``   - the bound the inference network φ maximises (differs only for piwae),
  * ``dreg_weights(lw)`` - c = g - ∂g_k/∂lw_k for the φ bound, with g = ∂phi/∂lw (docs/DESIGN.md).
    Bounds built from means and log-mean-exps have closed forms: mean over n samples → 1/n,
    logmeanexp over K → w̃², and sums / convex combinations combine linearly.

``theta`` is the value that gets logged: a true bound, never a gradient surrogate.
All reductions over samples use max-subtracted log-sum-exp, so lw ≈ -1000 is fine in fp32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict

import torch
from torch import Tensor


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


# -- the objectives ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Objective:
    name: str
    theta: Callable[[Tensor], Tensor]
    phi: Callable[[Tensor], Tensor]
    dreg_weights: Callable[[Tensor], Tensor]

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
    "iwae": lambda beta: Objective("iwae", miwae_bound, miwae_bound, miwae_dreg),
    "miwae": lambda beta: Objective("miwae", miwae_bound, miwae_bound, miwae_dreg),
    "ciwae": _ciwae,
    "piwae": lambda beta: Objective("piwae", flat_iwae_bound, miwae_bound, miwae_dreg),
}


def make_objective(name: str, beta: float = 0.5) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](beta)
