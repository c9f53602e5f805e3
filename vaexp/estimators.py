"""Gradient estimators as a small table of φ surrogates, combined with any objective.

Inputs per example: lw[M, K, B] (everything live) and lw_bar[M, K, B], the same log-weights
recomputed with the encoder's *parameters* stopped while z keeps its reparameterised path
(models.LogWeights). The θ surrogate is always the objective's θ bound of lw; θ only enters
through log p, so no estimator changes it.

φ surrogates (their φ-gradient is the estimator; their value means nothing):
  reparam  phi(lw)                     the full reparameterisation gradient
  stl      phi(lw_bar)                 = Σ g_k ∂lw̄_k/∂φ: the score term dropped (Roeder et al.)
  dreg     Σ_k c_k · lw_bar_k          c = g - ∂g/∂lw, detached (Tucker et al.)
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional

import torch
from torch import Tensor

from vaexp.objectives import Objective


def _reparam(obj: Objective, lw: Tensor, lw_bar: Optional[Tensor]) -> Tensor:
    return obj.phi(lw)


def _stl(obj: Objective, lw: Tensor, lw_bar: Tensor) -> Tensor:
    return obj.phi(lw_bar)


def _dreg(obj: Objective, lw: Tensor, lw_bar: Tensor) -> Tensor:
    c = obj.dreg_weights(lw.detach())
    return (c * lw_bar).sum(dim=(0, 1))


class Estimator(NamedTuple):
    name: str
    phi_surrogate: Callable[[Objective, Tensor, Optional[Tensor]], Tensor]
    needs_lw_bar: bool


ESTIMATORS: Dict[str, Estimator] = {
    "reparam": Estimator("reparam", _reparam, False),
    "stl": Estimator("stl", _stl, True),
    "dreg": Estimator("dreg", _dreg, True),
}


def get_estimator(name: str) -> Estimator:
    return ESTIMATORS[name]


class Losses(NamedTuple):
    """Scalar losses (negated batch means) and the logged bounds (per example, detached)."""

    theta_loss: Tensor
    phi_loss: Tensor
    bound: Tensor      # θ bound per example: the value to log
    phi_bound: Tensor  # φ bound per example (same values as `bound` unless the objective splits)


def surrogate_losses(obj: Objective, est: Estimator, lw: Tensor, lw_bar: Optional[Tensor]) -> Losses:
    theta_bound = obj.theta(lw)
    theta_loss = -theta_bound.mean()
    if est.name == "reparam" and not obj.split:
        phi_loss = theta_loss  # the same graph serves both networks: one backward pass
    else:
        phi_loss = -est.phi_surrogate(obj, lw, lw_bar).mean()
    phi_bound = obj.phi(lw.detach()) if obj.split else theta_bound
    return Losses(theta_loss, phi_loss, theta_bound.detach(), phi_bound.detach())


def gradients(losses: Losses, theta_params, phi_params):
    """θ grads from the θ loss and φ grads from the φ loss, so neither surrogate leaks.

    One backward when both losses are the same tensor (reparam on a non-split objective), two
    otherwise. Returns (theta_grads, phi_grads) as tuples matching the parameter lists.
    """
    theta_params, phi_params = list(theta_params), list(phi_params)
    if losses.theta_loss is losses.phi_loss:
        grads = torch.autograd.grad(losses.theta_loss, theta_params + phi_params)
        return grads[: len(theta_params)], grads[len(theta_params):]
    g_theta = torch.autograd.grad(losses.theta_loss, theta_params, retain_graph=True)
    g_phi = torch.autograd.grad(losses.phi_loss, phi_params)
    return g_theta, g_phi
