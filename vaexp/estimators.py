"""Gradient estimators as a small table of φ surrogates, combined with any objective.

Inputs (models.LogWeights): lw [M, K, B]; lw_bar, encoder *parameters* stopped, z on its path;
log_q_score, log q at the *stopped* samples, parameters live (its gradient is the score). θ's
surrogate is always the θ bound of lw. A φ surrogate's φ-gradient is the estimator (its value
means nothing); f = φ bound, g = ∂f/∂lw, c = g − ∂g_k/∂lw_k, r = ∂g_k/∂lw_k (logmeanexp: w̃, w̃²,
w̃ − w̃²), all detached (docs/DESIGN.md):
  reparam f(lw) | stl f(lw_bar) | dreg Σ c·lw_bar | rws Σ g·log_q_score | rws_dreg Σ r·lw_bar
  gdreg Σ ((1−α)c + αr)·lw_bar | dreg_norm, rws_dreg_norm: c, r / their sum per M group (biased)
  vimco Σ (s − g)·log_q_score, s_k = Σ_{terms S ∋ k} coef·(L_S − L̂_{S,−k}) (leave-one-out baselines)
The rws family and vimco read the φ bound's log-mean-exp terms (Objective.phi_terms);
:func:`undefined_because` says where an estimator is undefined or degenerate for an objective.
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional

import torch
from torch import Tensor

from vaexp.objectives import Objective
from vaexp.schema import GDREG_ALPHA


# -- the weights ------------------------------------------------------------------------------------

def _terms(obj: Objective, lw: Tensor):
    """(mask [G, 1, K, 1], coef [G, 1, 1, 1], masked lw [G, M, K, B], w̃ per term [G, M, K, B])."""
    terms = obj.phi_terms(lw.shape[1], lw.device, lw.dtype)
    n_terms, k = terms.mask.shape
    mask = terms.mask.view(n_terms, 1, k, 1)
    coef = terms.coef.view(n_terms, 1, 1, 1)
    masked = lw.unsqueeze(0).masked_fill(~mask, float("-inf"))
    return mask, coef, masked, torch.softmax(masked, dim=2)


def bound_weights(obj: Objective, lw: Tensor) -> Tensor:
    """g = ∂f/∂lw [M, K, B] of a φ bound made of log-mean-exp terms: Σ_terms coef·w̃ / M."""
    _, coef, _, w = _terms(obj, lw)
    return (coef * w).sum(0) / lw.shape[0]


def rws_dreg_weights(obj: Objective, lw: Tensor) -> Tensor:
    """r = ∂g_k/∂lw_k [M, K, B]: Σ_terms coef·(w̃ − w̃²) / M."""
    _, coef, _, w = _terms(obj, lw)
    return (coef * (w - w * w)).sum(0) / lw.shape[0]


def vimco_signal(obj: Objective, lw: Tensor) -> Tensor:
    """s_k [M, K, B]: Σ over the terms S that hold k of coef·(L_S − L̂_{S,−k}) / M, with L̂_{S,−k}
    the term's logmeanexp with sample k replaced by the geometric mean of the others in S."""
    mask, coef, masked, _ = _terms(obj, lw)
    k = lw.shape[1]
    n = mask.sum(2, keepdim=True).to(lw.dtype)                    # [G, 1, 1, 1] samples per term
    l_s = torch.logsumexp(masked, dim=2, keepdim=True) - torch.log(n)  # [G, M, 1, B]
    # [G, K(left out), M, K(i), B]: the term's samples without k
    eye = torch.eye(k, dtype=torch.bool, device=lw.device).view(1, k, 1, k, 1)
    keep = mask.unsqueeze(1) & ~eye
    loo = masked.unsqueeze(1).masked_fill(~keep, float("-inf"))
    geo = torch.where(keep, lw.unsqueeze(0).unsqueeze(0), torch.zeros((), dtype=lw.dtype, device=lw.device))
    geo = geo.sum(3) / (n.squeeze(3).unsqueeze(1) - 1)            # [G, K, M, B] mean log-weight of the rest
    l_hat = torch.logaddexp(torch.logsumexp(loo, dim=3), geo) - torch.log(n.squeeze(3).unsqueeze(1))
    signal = (l_s.squeeze(2).unsqueeze(1) - l_hat).permute(0, 2, 1, 3)  # [G, M, K, B]
    return (coef * torch.where(mask, signal, torch.zeros_like(signal))).sum(0) / lw.shape[0]


def _per_group_normalised(c: Tensor) -> Tensor:
    """c rescaled to sum to 1/M over each group's K samples (to one, then the mean over M)."""
    total = c.sum(1, keepdim=True).clamp_min(torch.finfo(c.dtype).tiny)  # all-zero weights: no update
    return c / (total * c.shape[0])


# -- the φ surrogates ---------------------------------------------------------------------------------

def _reparam(obj, lw, lw_bar, score, alpha) -> Tensor:
    return obj.phi(lw)


def _stl(obj, lw, lw_bar, score, alpha) -> Tensor:
    return obj.phi(lw_bar)


def _dreg(obj, lw, lw_bar, score, alpha) -> Tensor:
    c = obj.dreg_weights(lw.detach())
    return (c * lw_bar).sum(dim=(0, 1))


def _rws(obj, lw, lw_bar, score, alpha) -> Tensor:
    return (bound_weights(obj, lw.detach()) * score).sum(dim=(0, 1))


def _rws_dreg(obj, lw, lw_bar, score, alpha) -> Tensor:
    return (rws_dreg_weights(obj, lw.detach()) * lw_bar).sum(dim=(0, 1))


def _gdreg(obj, lw, lw_bar, score, alpha) -> Tensor:
    lw = lw.detach()
    c = (1.0 - alpha) * obj.dreg_weights(lw) + alpha * rws_dreg_weights(obj, lw)
    return (c * lw_bar).sum(dim=(0, 1))


def _dreg_norm(obj, lw, lw_bar, score, alpha) -> Tensor:
    return (_per_group_normalised(obj.dreg_weights(lw.detach())) * lw_bar).sum(dim=(0, 1))


def _rws_dreg_norm(obj, lw, lw_bar, score, alpha) -> Tensor:
    return (_per_group_normalised(rws_dreg_weights(obj, lw.detach())) * lw_bar).sum(dim=(0, 1))


def _vimco(obj, lw, lw_bar, score, alpha) -> Tensor:
    # The score term with the baselines, plus ∇φ f at fixed z: ∂lw/∂φ|_z = −∇φ log q, hence −g.
    lw = lw.detach()
    return ((vimco_signal(obj, lw) - bound_weights(obj, lw)) * score).sum(dim=(0, 1))


class Estimator(NamedTuple):
    name: str
    phi_surrogate: Callable[..., Tensor]  # (objective, lw, lw_bar, log_q_score, alpha) -> [B]
    needs_lw_bar: bool
    needs_score: bool = False   # log_q_score (models.LogWeights)
    wake: bool = False          # the rws family: importance weights of log-mean-exp terms, K >= 2
    loo: bool = False           # vimco: a leave-one-out baseline in every log-mean-exp term
    needs_convex: bool = False  # renormalised weights: only for non-negative ones
    alpha: Optional[float] = None  # gdreg's mixing weight (estimator.alpha)


# The one list of estimators (the checks, conf/estimator/*.yaml and every command read it).
ESTIMATORS: Dict[str, Estimator] = {
    "reparam": Estimator("reparam", _reparam, False),
    "stl": Estimator("stl", _stl, True),
    "dreg": Estimator("dreg", _dreg, True),
    "rws": Estimator("rws", _rws, False, needs_score=True, wake=True),
    "rws_dreg": Estimator("rws_dreg", _rws_dreg, True, wake=True),
    "gdreg": Estimator("gdreg", _gdreg, True, wake=True, alpha=GDREG_ALPHA),
    "dreg_norm": Estimator("dreg_norm", _dreg_norm, True, needs_convex=True),
    "rws_dreg_norm": Estimator("rws_dreg_norm", _rws_dreg_norm, True, wake=True, needs_convex=True),
    "vimco": Estimator("vimco", _vimco, False, needs_score=True, loo=True),
}


def get_estimator(name: str, alpha: Optional[float] = None) -> Estimator:
    """The estimator `name`; alpha sets gdreg's mixing weight (None: its default, schema.GDREG_ALPHA)."""
    est = ESTIMATORS[name]
    if alpha is None:
        return est
    if est.alpha is None:
        raise ValueError(f"estimator {name!r} has no alpha (only gdreg has)")
    return est._replace(alpha=float(alpha))


def undefined_because(est: Estimator, obj: Objective, k: int) -> Optional[str]:
    """Why `est` is undefined or degenerate for `obj` with K samples per group ("<problem>; <fix>"),
    or None. The CLI checks call it before any directory exists."""
    name = est.name
    what = ("gdreg mixes in rws_dreg, a reweighted wake-sleep update," if name == "gdreg"
            else f"{name} is a reweighted wake-sleep update,")
    if (est.wake or est.loo) and obj.phi_terms is None:
        where = "its beta*vae term is a plain mean of log-weights" if obj.name == "ciwae" else \
            "it is a plain mean of log-weights"
        if est.loo:
            return (f"vimco's baselines are leave-one-out log-mean-exps, and {obj.name}'s phi bound has none ({where})"
                    f"; use objective=iwae, miwae, piwae or jvi, or estimator=dreg")
        return (f"{what} which needs importance weights normalised within log-mean-exp groups, and {obj.name}'s "
                f"phi bound has none ({where}, whose wake-phi term has expectation 0); use objective=iwae, "
                f"miwae, piwae or jvi, or estimator=dreg")
    if est.needs_convex and not obj.convex:
        return (f"{name} renormalises weights to sum to one per group, which needs non-negative weights, and "
                f"{obj.name}'s have negative terms (its leave-one-out corrections); use estimator=dreg or gdreg")
    if est.wake or est.loo:
        sizes = obj.phi_terms(k, "cpu").mask.sum(1)
        if est.wake and int(sizes.max()) < 2:
            return (f"{what} and with k={k} every normalised weight is 1, so the wake-phi update has expectation 0 "
                    f"(the rws_dreg weights w - w^2 are exactly 0); use k >= 2")
        if est.loo and int(sizes.min()) < 2:
            need = 2 + (k - int(sizes.min()))
            return (f"vimco's leave-one-out baseline needs another sample in every log-mean-exp term, and with "
                    f"k={k} {obj.name} has a term of {int(sizes.min())} sample; use k >= {need}")
    return None


class Losses(NamedTuple):
    """Scalar losses (negated batch means) and the logged bounds (per example, detached)."""

    theta_loss: Tensor
    phi_loss: Tensor
    bound: Tensor      # θ bound per example: the value to log (for jvi the JVI estimate)
    phi_bound: Tensor  # φ bound per example (same values as `bound` unless the objective splits)


def surrogate_losses(obj: Objective, est: Estimator, lw: Tensor, lw_bar: Optional[Tensor],
                     log_q_score: Optional[Tensor] = None) -> Losses:
    theta_bound = obj.theta(lw)
    theta_loss = -theta_bound.mean()
    if est.name == "reparam" and not obj.split:
        phi_loss = theta_loss  # the same graph serves both networks: one backward pass
    else:
        phi_loss = -est.phi_surrogate(obj, lw, lw_bar, log_q_score, est.alpha).mean()
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
