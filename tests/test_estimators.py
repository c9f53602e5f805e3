"""Gradient estimators checked against a slow, obviously-correct reference.

The reference recomputes the log-weights from the model's submodules with torch.distributions,
writes its own bounds, and builds every gradient from the formulas of DESIGN.md:
  θ        ∇θ f_θ(lw)
  reparam  ∇φ f_φ(lw)
  stl      Σ_k g_k ∂lw̄_k/∂φ,                  g = ∂f_φ/∂lw (detached)
  dreg     Σ_k (g_k − ∂g_k/∂lw_k) ∂lw̄_k/∂φ,   the diagonal by double backward
with lw̄ from a deep-copied, frozen encoder in the log q term (z, and z1 as the input of
q(z2|z1), stay live). ∂lw̄_k/∂φ is taken one log-weight at a time (a Jacobian loop).
Nothing in the reference uses vaexp.estimators or vaexp.objectives.
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch.distributions import Bernoulli, Normal

from vaexp.estimators import ESTIMATORS, get_estimator, gradients, surrogate_losses
from vaexp.models.burda import VAE
from vaexp.objectives import make_objective
from vaexp.schema import GDREG_ALPHA

ARCHS = {"burda1": ([3], [4]), "burda2": ([3, 2], [4, 3])}
OBJECTIVES = ["vae", "iwae", "miwae", "ciwae", "piwae"]
EST_NAMES = ["reparam", "stl", "dreg"]
K, B, X_DIM, BETA, SEED = 3, 2, 6, 0.3, 1234
F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Every tensor here is tiny: intra-op threads only add synchronisation (badly so on a busy
    machine). Restored afterwards, so other test files are unaffected."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def m_for(objective: str) -> int:
    return 1 if objective == "iwae" else 2  # iwae is defined with m = 1 (m > 1 is miwae)


# -- the model and data ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def make_model(arch: str) -> VAE:
    latents, hidden = ARCHS[arch]
    torch.manual_seed(0)
    model = VAE(latents, hidden, depth=2, activation="tanh", x_dim=X_DIM).double()
    with torch.no_grad():  # move off the symmetric init (zero biases) to a generic point
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def make_x() -> torch.Tensor:
    return torch.tensor([[1, 0, 1, 1, 0, 0], [0, 0, 1, 0, 1, 1]], dtype=F64)


def draw_eps(model: VAE, m: int, k: int, b: int, seed: int = SEED):
    """The same draws as VAE.log_weights with a generator seeded `seed`: layer by layer,
    [M, K, B, D_i] each."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((m, k, b, d), generator=g, dtype=F64) for d in model.latents]


def vaexp_log_weights(model, x, m, k, need_bar, seed=SEED):
    return model.log_weights(x, m, k, need_bar=need_bar, generator=torch.Generator().manual_seed(seed))


# -- the reference -----------------------------------------------------------------------------

def normal_lp(z, mu, logsig):
    return Normal(mu, torch.exp(logsig)).log_prob(z).sum(-1)


def ref_log_weights(model: VAE, x, eps, frozen_encoder=None):
    """lw (everything live) and, with a frozen encoder copy, lw̄ (its log q uses the frozen copy
    on the live samples). Returns (lw, lw_bar, zs, log_p, log_q)."""
    m, k = eps[0].shape[:2]
    h = x.expand(m, k, *x.shape)  # the encoder on every sample's copy of x: slow, clearly right
    log_q = 0.0
    log_q_bar = 0.0
    zs = []
    for i, layer in enumerate(model.encoder):
        mu, logsig = layer(h)
        z = mu + torch.exp(logsig) * eps[i]
        log_q = log_q + normal_lp(z, mu, logsig)
        if frozen_encoder is not None:
            mu_f, logsig_f = frozen_encoder[i](h)  # h: x, or the live z_{i-1}
            log_q_bar = log_q_bar + normal_lp(z, mu_f, logsig_f)
        zs.append(z)
        h = z
    log_p = Bernoulli(logits=model.decoder[0](zs[0])).log_prob(x.expand(m, k, *x.shape)).sum(-1)
    for i in range(1, len(zs)):
        mu, logsig = model.decoder[i](zs[i])
        log_p = log_p + normal_lp(zs[i - 1], mu, logsig)
    log_p = log_p + Normal(torch.zeros_like(zs[-1]), torch.ones_like(zs[-1])).log_prob(zs[-1]).sum(-1)
    lw = log_p - log_q
    lw_bar = log_p - log_q_bar if frozen_encoder is not None else None
    return lw, lw_bar, zs, log_p, log_q


def frozen_copy(encoder):
    enc = copy.deepcopy(encoder)
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc


def _lme(lw, dims):
    n = 1
    for d in dims:
        n *= lw.shape[d]
    return torch.logsumexp(lw, dim=dims) - torch.log(torch.tensor(float(n), dtype=lw.dtype))


def ref_vae(lw):
    return lw.mean(dim=(0, 1))


def ref_miwae(lw):
    return _lme(lw, (1,)).mean(0)


def ref_flat(lw):
    return _lme(lw, (0, 1))


def ref_theta(name, lw):
    return {"vae": ref_vae, "iwae": ref_miwae, "miwae": ref_miwae, "piwae": ref_flat,
            "ciwae": lambda v: BETA * ref_vae(v) + (1 - BETA) * ref_miwae(v)}[name](lw)


def ref_phi(name, lw):
    return ref_miwae(lw) if name == "piwae" else ref_theta(name, lw)


def g_and_c(fn, lw):
    """g = ∂(Σ_b f_b)/∂lw and c = g − diag ∂g/∂lw, by autograd (double backward), detached."""
    x = lw.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
    diag = torch.zeros_like(x)
    if g.requires_grad:
        for idx in torch.cartesian_prod(*[torch.arange(n) for n in x.shape]).tolist():
            idx = tuple(idx)
            (h,) = torch.autograd.grad(g[idx], x, retain_graph=True)
            diag[idx] = h[idx]
    return g.detach(), (g - diag).detach()


class Reference(NamedTuple):
    lw: torch.Tensor                # values
    lw_bar: torch.Tensor            # values
    jac_bar: dict                   # (m, k, b) -> ∂lw̄[m,k,b]/∂φ, a tuple over phi params


@functools.lru_cache(maxsize=None)
def reference(arch: str, m: int, seed: int = SEED) -> Reference:
    model = make_model(arch)
    x = make_x()
    eps = draw_eps(model, m, K, B, seed)
    phi = model.phi_parameters()
    lw, lw_bar, *_ = ref_log_weights(model, x, eps, frozen_copy(model.encoder))
    jac = {}
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in lw_bar.shape]).tolist():
        jac[tuple(idx)] = torch.autograd.grad(lw_bar[tuple(idx)], phi, retain_graph=True)
    return Reference(lw.detach(), lw_bar.detach(), jac)


def weighted_jacobian(ref: Reference, weights: torch.Tensor):
    """Σ_{m,k,b} weights[m,k,b] · ∂lw̄[m,k,b]/∂φ."""
    out = None
    for idx, grads in ref.jac_bar.items():
        term = [weights[idx] * gr for gr in grads]
        out = term if out is None else [o + t for o, t in zip(out, term)]
    return tuple(out)


def ref_theta_grads(model, x, eps, objective):
    lw, *_ = ref_log_weights(model, x, eps)
    return torch.autograd.grad(-ref_theta(objective, lw).mean(), model.theta_parameters())


def ref_phi_grads(arch, objective, estimator, m, seed=SEED):
    model = make_model(arch)
    b = B
    if estimator == "reparam":
        lw, *_ = ref_log_weights(model, make_x(), draw_eps(model, m, K, b, seed))
        return torch.autograd.grad(-ref_phi(objective, lw).mean(), model.phi_parameters())
    ref = reference(arch, m, seed)
    g, c = g_and_c(lambda v: ref_phi(objective, v), ref.lw)
    w = g if estimator == "stl" else c
    return weighted_jacobian(ref, -w / b)  # the loss is minus the batch mean


def vaexp_grads(arch, objective, estimator, m, seed=SEED):
    model = make_model(arch)
    obj = make_objective(objective, beta=BETA)
    est = get_estimator(estimator)
    lws = vaexp_log_weights(model, make_x(), m, K, est.needs_lw_bar, seed)
    losses = surrogate_losses(obj, est, lws.lw, lws.lw_bar)
    gt, gp = gradients(losses, model.theta_parameters(), model.phi_parameters())
    return losses, lws, gt, gp


def flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def assert_grads_close(a, b, rtol=1e-8, atol=1e-11):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def rel_diff(a, b) -> float:
    a, b = flat(a), flat(b)
    return ((a - b).norm() / torch.maximum(a.norm(), b.norm())).item()


# -- log_weights -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("need_bar", [False, True])
def test_log_weights_match_reference(arch, need_bar):
    model, x, m = make_model(arch), make_x(), 2
    lws = vaexp_log_weights(model, x, m, K, need_bar)
    lw, lw_bar, zs, log_p, log_q = ref_log_weights(model, x, draw_eps(model, m, K, B),
                                                   frozen_copy(model.encoder))
    assert lws.lw.shape == (m, K, B) and lws.lw.dtype == F64
    torch.testing.assert_close(lws.lw, lw, rtol=1e-12, atol=1e-12)
    # lw = log p(x, z) − log q(z|x), and it is not a degenerate number
    torch.testing.assert_close(lws.lw, log_p - log_q, rtol=1e-12, atol=1e-12)
    assert lws.lw.std() > 0.1
    assert len(lws.zs) == len(model.latents)
    for z, z_ref, d in zip(lws.zs, zs, model.latents):
        assert z.shape == (m, K, B, d)
        torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
    if need_bar:
        # the same values as lw; only the gradients differ
        torch.testing.assert_close(lws.lw_bar, lws.lw, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lws.lw_bar, lw_bar, rtol=1e-12, atol=1e-12)
    else:
        assert lws.lw_bar is None


@pytest.mark.parametrize("arch", list(ARCHS))
def test_lw_bar_gradient_is_the_path_derivative(arch):
    """∂lw̄/∂φ from the model equals the reference's (frozen encoder in log q), and differs from
    ∂lw/∂φ (which has the score term)."""
    model, x, m = make_model(arch), make_x(), 2
    ref = reference(arch, m)
    lws = vaexp_log_weights(model, x, m, K, need_bar=True)
    phi = model.phi_parameters()
    idx = (1, 2, 0)
    assert_grads_close(torch.autograd.grad(lws.lw_bar[idx], phi, retain_graph=True), ref.jac_bar[idx])
    full = torch.autograd.grad(lws.lw[idx], phi)
    assert rel_diff(full, ref.jac_bar[idx]) > 1e-2


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("need_bar", [False, True])
def test_first_encoder_layer_runs_once_per_example(arch, need_bar):
    model, x = make_model(arch), make_x()
    shapes = []
    handle = model.encoder[0].register_forward_pre_hook(lambda mod, inp: shapes.append(tuple(inp[0].shape)))
    try:
        vaexp_log_weights(model, x, 2, K, need_bar)
    finally:
        handle.remove()
    assert shapes == [(B, X_DIM)]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_sample_follows_model_dtype(arch):
    """Regression: VAE.sample drew its noise in the default dtype and failed on a float64 model."""
    out = make_model(arch).sample(3, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, X_DIM) and out.dtype == F64
    assert torch.all((out > 0) & (out < 1))


# -- gradients: every objective × estimator × architecture against the reference --------------

@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("estimator", EST_NAMES)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_gradients_match_reference(arch, objective, estimator):
    m = m_for(objective)
    model = make_model(arch)
    losses, lws, gt, gp = vaexp_grads(arch, objective, estimator, m)
    eps = draw_eps(model, m, K, B)
    assert_grads_close(gt, ref_theta_grads(model, make_x(), eps, objective))
    assert_grads_close(gp, ref_phi_grads(arch, objective, estimator, m))
    # the logged values are the true bounds, per example
    lw_ref, *_ = ref_log_weights(model, make_x(), eps)
    torch.testing.assert_close(losses.bound, ref_theta(objective, lw_ref).detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(losses.phi_bound, ref_phi(objective, lw_ref).detach(), rtol=1e-12, atol=1e-12)
    assert not losses.bound.requires_grad and not losses.phi_bound.requires_grad
    torch.testing.assert_close(losses.theta_loss.detach(), -losses.bound.mean(), rtol=1e-12, atol=1e-12)


def test_every_estimator_is_covered():
    # reparam, stl, dreg here; the rest below (NEW_ESTIMATORS), each against its own paper's formula
    assert sorted(ESTIMATORS) == sorted(EST_NAMES + NEW_ESTIMATORS)


# -- properties the estimators must have --------------------------------------------------------

@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("objective", ["iwae", "vae"])
def test_reparam_and_stl_phi_gradients_differ(arch, objective):
    m = m_for(objective)
    _, _, _, gp_r = vaexp_grads(arch, objective, "reparam", m)
    _, _, _, gp_s = vaexp_grads(arch, objective, "stl", m)
    assert rel_diff(gp_r, gp_s) > 1e-2  # the score term, not rounding


@pytest.mark.parametrize("arch", list(ARCHS))
def test_dreg_equals_stl_for_vae(arch):
    _, _, _, gp_d = vaexp_grads(arch, "vae", "dreg", 2)
    _, _, _, gp_s = vaexp_grads(arch, "vae", "stl", 2)
    assert_grads_close(gp_d, gp_s, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("objective", ["iwae", "miwae", "ciwae", "piwae"])
def test_dreg_differs_from_stl_for_importance_weighted_bounds(arch, objective):
    m = m_for(objective)
    _, _, _, gp_d = vaexp_grads(arch, objective, "dreg", m)
    _, _, _, gp_s = vaexp_grads(arch, objective, "stl", m)
    assert rel_diff(gp_d, gp_s) > 1e-2


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_theta_gradients_identical_across_estimators(arch, objective):
    m = m_for(objective)
    gts = [vaexp_grads(arch, objective, e, m)[2] for e in EST_NAMES]
    for gt in gts[1:]:
        assert_grads_close(gt, gts[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("estimator", ["stl", "dreg"])
@pytest.mark.parametrize("objective", ["iwae", "miwae", "ciwae"])
def test_phi_surrogate_does_not_leak_into_theta(arch, objective, estimator):
    """The φ surrogate has a θ-gradient of its own (log p is in lw̄); it must not be used."""
    m = m_for(objective)
    model = make_model(arch)
    _, _, gt, _ = vaexp_grads(arch, objective, estimator, m)
    ref = ref_theta_grads(model, make_x(), draw_eps(model, m, K, B), objective)
    assert_grads_close(gt, ref)
    # the θ-gradient the φ surrogate would give, on a fresh graph from the same draws
    est = get_estimator(estimator)
    lws = vaexp_log_weights(model, make_x(), m, K, est.needs_lw_bar)
    losses = surrogate_losses(make_objective(objective, beta=BETA), est, lws.lw, lws.lw_bar)
    leaked = torch.autograd.grad(losses.phi_loss, model.theta_parameters())
    if estimator == "dreg":  # Σ c ∂log p/∂θ ≠ Σ g ∂log p/∂θ
        assert rel_diff(leaked, ref) > 1e-2
    mixed = [a + b for a, b in zip(ref, leaked)]  # θ-grad of θ loss + φ loss together
    assert rel_diff(mixed, gt) > 0.3


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("estimator", EST_NAMES)
def test_piwae_theta_is_flat_iwae_and_phi_is_miwae(arch, estimator):
    m = 2
    model = make_model(arch)
    x, eps = make_x(), draw_eps(model, m, K, B)
    _, _, gt, gp = vaexp_grads(arch, "piwae", estimator, m)
    # θ: the flat iwae over M·K = the iwae bound with M·K samples in the log
    lw, *_ = ref_log_weights(model, x, eps)
    flat_theta = torch.autograd.grad(-ref_flat(lw).mean(), model.theta_parameters(), retain_graph=True)
    assert_grads_close(gt, flat_theta)
    miwae_theta = torch.autograd.grad(-ref_miwae(lw).mean(), model.theta_parameters())
    assert rel_diff(gt, miwae_theta) > 1e-3
    # φ: the miwae(M, K) estimator, same draws
    _, _, _, gp_miwae = vaexp_grads(arch, "miwae", estimator, m)
    assert_grads_close(gp, gp_miwae, rtol=1e-12, atol=1e-14)
    lw, *_ = ref_log_weights(model, x, eps)
    flat_phi = torch.autograd.grad(-ref_flat(lw).mean(), model.phi_parameters())
    assert rel_diff(gp, flat_phi) > 1e-3


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("estimator", EST_NAMES)
@pytest.mark.parametrize("objective", ["miwae", "ciwae", "piwae"])
def test_logged_bound_is_not_the_surrogate(arch, objective, estimator):
    m = 2
    model = make_model(arch)
    losses, _, _, _ = vaexp_grads(arch, objective, estimator, m)
    lw, *_ = ref_log_weights(model, make_x(), draw_eps(model, m, K, B))
    true = ref_theta(objective, lw).detach()
    torch.testing.assert_close(losses.bound, true, rtol=1e-12, atol=1e-12)
    if estimator == "dreg" or objective == "piwae":
        # Σ c·lw̄ (dreg) or the φ bound (piwae) is not the θ bound
        assert (-losses.phi_loss.detach() - true.mean()).abs() > 1e-3


def test_gradients_one_pass_for_shared_loss_two_for_split():
    arch, m = "burda1", 2
    losses, _, _, _ = vaexp_grads(arch, "miwae", "reparam", m)
    assert losses.theta_loss is losses.phi_loss
    losses, _, _, _ = vaexp_grads(arch, "piwae", "reparam", m)
    assert losses.theta_loss is not losses.phi_loss


# -- unbiasedness (Monte Carlo): what the formulas are for --------------------------------------
#
# With objective miwae, one φ gradient is the mean of M independent iwae_K gradient estimates (the
# M axis is a free replicate axis); n seeds give n independent such means. For paired draws
# d = est − reparam, under E[d] = 0 the statistic
#     S = n ‖mean d‖² / tr(Σ̂)
# is ≈ a convex combination of χ²₁ variables divided by tr(Σ̂)/tr(Σ), whatever the (strong)
# correlation between parameters: its tail is at most that of F(1, n−1) beyond ~2 (Székely &
# Bakirov 2003), whose 99.9% point for n = 16 is 16.6. A per-component Σ t² is NOT safe here:
# the components are highly correlated.

MC_M, MC_SEEDS, S_MAX = 1000, 16, 16.0


def _mc_phi_grads(arch, objective, estimator, seeds):
    return torch.stack([flat(vaexp_grads(arch, objective, estimator, MC_M, seed=s)[3]) for s in seeds])


def _S(d: torch.Tensor) -> float:
    n = d.shape[0]
    return (n * (d.mean(0) ** 2).sum() / d.var(0).sum()).item()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_dreg_unbiased_stl_biased_for_iwae(arch):
    """E[dreg] = E[reparam] = ∇φ IWAE_K; STL is biased for K > 1 (Tucker et al.). Detaching z1
    as the input of q(z2|z1) in lw̄ would make DReG biased too (S ≈ 60 for burda2)."""
    seeds = range(100, 100 + MC_SEEDS)
    rep = _mc_phi_grads(arch, "miwae", "reparam", seeds)
    assert _S(_mc_phi_grads(arch, "miwae", "dreg", seeds) - rep) < S_MAX
    assert _S(_mc_phi_grads(arch, "miwae", "stl", seeds) - rep) > 20 * S_MAX


@pytest.mark.parametrize("arch", list(ARCHS))
def test_stl_unbiased_for_vae(arch):
    seeds = range(200, 200 + MC_SEEDS)
    rep = _mc_phi_grads(arch, "vae", "reparam", seeds)
    assert _S(_mc_phi_grads(arch, "vae", "stl", seeds) - rep) < S_MAX


# ================================================================================================
# The rest of the family: RWS, RWS-DReG, GDReG, the renormalised heuristics, VIMCO, and the jvi
# objective, each against a reference written from its paper's formula with explicit loops over
# samples (leave-one-out sets spelled out), never the code's masks or closed forms.
#   rws (Bornschein & Bengio 2015)   Σ_k w̃_k ∇φ log q(z̄_k|x), z̄ stopped (both layers), per M group
#   rws_dreg (Tucker et al. 2019)    Σ_k (w̃_k − w̃_k²) ∂lw̄_k/∂φ
#   gdreg(α)                         (1−α)·dreg + α·rws_dreg
#   dreg_norm, rws_dreg_norm         the weights divided by their sum over K, per M group
#   vimco (Mnih & Rezende 2016)      Σ_k (L − L̂_{−k}) ∇φ log q(z̄_k) + ∇φ L at fixed z̄, with
#                                    L̂_{−k} = log((Σ_{j≠k} w_j + exp(mean_{j≠k} lw_j)) / K)
#   jvi (Nowozin 2018)               K·L_K − (K−1)/K Σ_j L_{K−1}^(−j); every per-group weight above
#                                    is jackknifed the same way (each log-mean-exp term contributes
#                                    its own weights, with the term's coefficient)
# ================================================================================================

NEW_ESTIMATORS = ["rws", "rws_dreg", "gdreg", "dreg_norm", "rws_dreg_norm", "vimco"]
ALPHA = 0.3
LME_OBJECTIVES = ["iwae", "miwae", "piwae", "jvi"]  # φ bounds made of log-mean-exps only
SUPPORTED = {
    "rws": LME_OBJECTIVES, "rws_dreg": LME_OBJECTIVES, "gdreg": LME_OBJECTIVES,
    "rws_dreg_norm": ["iwae", "miwae", "piwae"], "vimco": LME_OBJECTIVES,
    "dreg_norm": ["vae", "iwae", "miwae", "ciwae", "piwae"],
}


def ref_jvi(lw):
    k = lw.shape[1]
    loo = [_lme(lw[:, [i for i in range(k) if i != j]], (1,)) for j in range(k)]
    return (k * _lme(lw, (1,)) - (k - 1) / k * sum(loo)).mean(0)


def ref_phi_all(name, lw):
    return ref_jvi(lw) if name == "jvi" else ref_phi(name, lw)


def ref_theta_all(name, lw):
    return ref_jvi(lw) if name == "jvi" else ref_theta(name, lw)


def ref_norm_weights(v):
    """softmax over the K axis (dim 1), the schoolbook way."""
    e = torch.exp(v - v.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def ref_vimco_signal(v):
    """L − L̂_{−k} per sample of each group [M, n, B] (Mnih & Rezende's learning signal)."""
    n = v.shape[1]
    big_l = _lme(v, (1,))
    out = torch.zeros_like(v)
    for k in range(n):
        rest = v[:, [j for j in range(n) if j != k]]
        l_hat = torch.log((torch.exp(rest).sum(1) + torch.exp(rest.mean(1))) / n)
        out[:, k] = big_l - l_hat
    return out


def per_group(objective, lw, fn):
    """Σ over the φ bound's log-mean-exp terms of coef·fn(term's samples), per M group, / M: for
    iwae/miwae/piwae one term (all K); for jvi K·fn(all) − (K−1)/K Σ_j fn(all but j)."""
    m, k = lw.shape[:2]
    if objective != "jvi":
        return fn(lw) / m
    out = k * fn(lw)
    for j in range(k):
        idx = [i for i in range(k) if i != j]
        part = torch.zeros_like(lw)
        part[:, idx] = fn(lw[:, idx])
        out = out - (k - 1) / k * part
    return out / m


def ref_log_q_stopped(model, x, zs):
    """log q_φ(z̄|x) with every z stopped (z1 too, as the input of q(z2|z1)), the encoder live."""
    m, k = zs[0].shape[:2]
    h = x.expand(m, k, *x.shape)
    out = 0.0
    for i, layer in enumerate(model.encoder):
        mu, logsig = layer(h if i == 0 else zs[i - 1].detach())
        out = out + normal_lp(zs[i].detach(), mu, logsig)
    return out


@functools.lru_cache(maxsize=None)
def score_reference(arch: str, m: int, seed: int = SEED):
    """(log p at the samples (values), ∂ log q(z̄_{m,k,b})/∂φ per entry, the stopped-z lw as a
    function of φ for the explicit term)."""
    model = make_model(arch)
    x = make_x()
    _, _, zs, log_p, _ = ref_log_weights(model, x, draw_eps(model, m, K, B, seed))
    log_q = ref_log_q_stopped(model, x, zs)
    phi = model.phi_parameters()
    jac = {}
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in log_q.shape]).tolist():
        jac[tuple(idx)] = torch.autograd.grad(log_q[tuple(idx)], phi, retain_graph=True)
    return log_p.detach(), jac


def weighted_score(jac, weights):
    out = None
    for idx, grads in jac.items():
        term = [weights[idx] * gr for gr in grads]
        out = term if out is None else [o + t for o, t in zip(out, term)]
    return tuple(out)


def ref_new_phi_grads(arch, objective, estimator, m, seed=SEED):
    """The φ gradient of the *loss* (minus the batch mean), from the formulas above."""
    model = make_model(arch)
    ref = reference(arch, m, seed)
    lw = ref.lw
    w_sq = lambda v: ref_norm_weights(v) ** 2  # noqa: E731
    w_rd = lambda v: ref_norm_weights(v) - ref_norm_weights(v) ** 2  # noqa: E731
    if estimator in ("rws", "vimco"):
        log_p, jac = score_reference(arch, m, seed)
        g = per_group(objective, lw, ref_norm_weights)
        if estimator == "rws":
            return weighted_score(jac, -g / B)
        s = per_group(objective, lw, ref_vimco_signal)
        score_part = weighted_score(jac, -s / B)
        # ∇φ L at fixed z̄: autograd through log p(x, z̄) − log q_φ(z̄|x)
        x = make_x()
        _, _, zs, _, _ = ref_log_weights(model, x, draw_eps(model, m, K, B, seed))
        lw_fixed = log_p - ref_log_q_stopped(model, x, zs)
        explicit = torch.autograd.grad(-ref_phi_all(objective, lw_fixed).mean(), model.phi_parameters())
        return tuple(a + b for a, b in zip(score_part, explicit))
    if objective == "jvi" or objective in LME_OBJECTIVES:
        c = per_group(objective, lw, w_sq)
    if estimator == "dreg_norm" and objective in ("vae", "ciwae"):
        _, c = g_and_c(lambda v: ref_phi(objective, v), lw)  # the DReG weights of the mixed bound
    r = per_group(objective, lw, w_rd) if objective in LME_OBJECTIVES else None
    weights = {"rws_dreg": lambda: r,
               "gdreg": lambda: (1 - ALPHA) * c + ALPHA * r,
               "dreg_norm": lambda: c / c.sum(1, keepdim=True) / m,
               "rws_dreg_norm": lambda: r / r.sum(1, keepdim=True) / m}[estimator]()
    return weighted_jacobian(ref, -weights / B)


def vaexp_all_grads(arch, objective, estimator, m, seed=SEED, alpha=None):
    model = make_model(arch)
    obj = make_objective(objective, beta=BETA)
    est = get_estimator(estimator, ALPHA if estimator == "gdreg" and alpha is None else alpha)
    lws = model.log_weights(make_x(), m, K, need_bar=est.needs_lw_bar, need_score=est.needs_score,
                            generator=torch.Generator().manual_seed(seed))
    losses = surrogate_losses(obj, est, lws.lw, lws.lw_bar, lws.log_q_score)
    gt, gp = gradients(losses, model.theta_parameters(), model.phi_parameters())
    return losses, lws, gt, gp


def test_support_table_is_the_estimators_own():
    """SUPPORTED (what these tests cover) is exactly where vaexp.estimators says it is defined."""
    from vaexp.estimators import undefined_because

    for est in NEW_ESTIMATORS:
        ok = [o for o in OBJECTIVES + ["jvi"] if undefined_because(get_estimator(est), make_objective(o), K) is None]
        assert ok == [o for o in OBJECTIVES + ["jvi"] if o in SUPPORTED[est]], est


def test_reference_weights_are_the_bound_s_own():
    """The reference's per-group weights are ∂f/∂lw (g), and its w̃² weights jvi's DReG c: checked
    by autograd, so the references below rest on the bound alone."""
    for objective in LME_OBJECTIVES:
        lw = reference("burda1", m_for(objective)).lw
        g, c = g_and_c(lambda v: ref_phi_all(objective, v), lw)
        torch.testing.assert_close(per_group(objective, lw, ref_norm_weights), g, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(per_group(objective, lw, lambda v: ref_norm_weights(v) ** 2), c,
                                   rtol=1e-10, atol=1e-12)


CASES = [(e, o) for e in NEW_ESTIMATORS for o in SUPPORTED[e]]


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("estimator,objective", CASES)
def test_new_estimators_match_their_papers(arch, estimator, objective):
    m = m_for(objective)
    model = make_model(arch)
    losses, _, gt, gp = vaexp_all_grads(arch, objective, estimator, m)
    eps = draw_eps(model, m, K, B)
    lw_ref, *_ = ref_log_weights(model, make_x(), eps)
    assert_grads_close(gt, torch.autograd.grad(-ref_theta_all(objective, lw_ref).mean(), model.theta_parameters()))
    ref = ref_new_phi_grads(arch, objective, estimator, m)
    assert_grads_close(gp, ref)
    # the logged value is the true θ bound (for jvi the JVI estimate), not the surrogate
    torch.testing.assert_close(losses.bound, ref_theta_all(objective, lw_ref).detach(), rtol=1e-12, atol=1e-12)
    if objective != "vae":  # on vae dreg_norm's Σ (1/MK)·lw̄ has the bound's value (only its gradient differs)
        assert (-losses.phi_loss.detach() - losses.bound.mean()).abs() > 1e-3
    assert flat(gp).norm() > 1e-3


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("estimator", EST_NAMES)
def test_jvi_with_reparam_stl_dreg_match_the_reference(arch, estimator):
    """jvi with the three original estimators: reparam ∇φ jvi, stl Σ g ∂lw̄/∂φ, dreg Σ c ∂lw̄/∂φ,
    g and c of the reference jvi by autograd (jvi-dreg = dreg_estimators' jk-dreg)."""
    m = 2
    model = make_model(arch)
    _, _, gt, gp = vaexp_all_grads(arch, "jvi", estimator, m)
    eps = draw_eps(model, m, K, B)
    lw, *_ = ref_log_weights(model, make_x(), eps)
    assert_grads_close(gt, torch.autograd.grad(-ref_jvi(lw).mean(), model.theta_parameters(), retain_graph=True))
    if estimator == "reparam":
        want = torch.autograd.grad(-ref_jvi(lw).mean(), model.phi_parameters())
    else:
        ref = reference(arch, m)
        g, c = g_and_c(ref_jvi, ref.lw)
        want = weighted_jacobian(ref, -(g if estimator == "stl" else c) / B)
    assert_grads_close(gp, want)


def test_log_q_score_is_the_score():
    """The new LogWeights field: values log q(z|x); φ-gradient with every z stopped; none without
    need_score."""
    for arch in ARCHS:
        model, x, m = make_model(arch), make_x(), 2
        lws = model.log_weights(x, m, K, need_score=True, generator=torch.Generator().manual_seed(SEED))
        _, _, zs, log_p, log_q = ref_log_weights(model, x, draw_eps(model, m, K, B))
        torch.testing.assert_close(lws.log_q_score, log_q, rtol=1e-12, atol=1e-12)
        _, jac = score_reference(arch, m)
        idx = (1, 2, 0)
        assert_grads_close(torch.autograd.grad(lws.log_q_score[idx], model.phi_parameters(), retain_graph=True),
                           jac[idx])
        assert all(float(g.abs().max()) == 0 for g in torch.autograd.grad(
            lws.log_q_score.sum(), model.theta_parameters(), allow_unused=True, materialize_grads=True))
        assert model.log_weights(x, m, K).log_q_score is None


# -- identities ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("objective", LME_OBJECTIVES)
def test_gdreg_endpoints_are_dreg_and_rws_dreg(arch, objective):
    m = m_for(objective)
    gd0 = vaexp_all_grads(arch, objective, "gdreg", m, alpha=0.0)[3]
    gd1 = vaexp_all_grads(arch, objective, "gdreg", m, alpha=1.0)[3]
    assert_grads_close(gd0, vaexp_all_grads(arch, objective, "dreg", m)[3], rtol=1e-14, atol=1e-16)
    assert_grads_close(gd1, vaexp_all_grads(arch, objective, "rws_dreg", m)[3], rtol=1e-14, atol=1e-16)
    # and it is linear in α in between
    half = vaexp_all_grads(arch, objective, "gdreg", m, alpha=0.5)[3]
    assert_grads_close(half, tuple(0.5 * a + 0.5 * b for a, b in zip(gd0, gd1)), rtol=1e-10, atol=1e-13)
    assert rel_diff(gd0, gd1) > 1e-2


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("objective", LME_OBJECTIVES)
def test_stl_is_reparam_plus_rws_and_dreg_plus_rws_dreg(arch, objective):
    """Draw by draw: ∂lw/∂φ = ∂lw̄/∂φ − ∇φ log q(z̄), so Σ g ∂lw̄/∂φ (stl) = reparam +
    Σ g ∇φ log q (rws); and g = c + r, so stl = dreg + rws_dreg. Pins rws's and rws_dreg's signs
    and factors."""
    m = m_for(objective)
    g = {e: flat(vaexp_all_grads(arch, objective, e, m)[3]) for e in ("reparam", "stl", "dreg", "rws", "rws_dreg")}
    torch.testing.assert_close(g["stl"], g["reparam"] + g["rws"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g["stl"], g["dreg"] + g["rws_dreg"], rtol=1e-10, atol=1e-12)
    assert g["rws"].norm() > 1e-2 and g["rws_dreg"].norm() > 1e-2


@pytest.mark.parametrize("arch", list(ARCHS))
def test_norm_variants_on_one_group_are_tuckers(arch):
    """dreg_norm on iwae: w̃²/Σw̃²; on vae (uniform weights) it is dreg = stl."""
    assert_grads_close(vaexp_all_grads(arch, "vae", "dreg_norm", 2)[3], vaexp_all_grads(arch, "vae", "stl", 2)[3],
                       rtol=1e-10, atol=1e-13)
    norm, plain = vaexp_all_grads(arch, "iwae", "dreg_norm", 1)[3], vaexp_all_grads(arch, "iwae", "dreg", 1)[3]
    assert rel_diff(norm, plain) > 1e-2


@pytest.mark.parametrize("arch", list(ARCHS))
def test_rws_at_k1_degenerates(arch):
    """K = 1: the one normalised weight is 1, so rws is ∇φ log q(z̄) (expectation 0: the score,
    tests/test_gaussian.py measures it) and rws_dreg's weights w̃ − w̃² are 0: exactly no update.
    (The CLI refuses both, with this reason.)"""
    model = make_model(arch)
    obj = make_objective("miwae")
    for name in ("rws_dreg", "rws_dreg_norm"):
        est = get_estimator(name)
        lws = model.log_weights(make_x(), 3, 1, need_bar=True, generator=torch.Generator().manual_seed(1))
        gp = gradients(surrogate_losses(obj, est, lws.lw, lws.lw_bar), model.theta_parameters(),
                       model.phi_parameters())[1]
        assert float(flat(gp).abs().max()) == 0.0
    lws = model.log_weights(make_x(), 3, 1, need_score=True, generator=torch.Generator().manual_seed(1))
    gp = gradients(surrogate_losses(obj, get_estimator("rws"), lws.lw, None, lws.log_q_score),
                   model.theta_parameters(), model.phi_parameters())[1]
    lws = model.log_weights(make_x(), 3, 1, need_score=True, generator=torch.Generator().manual_seed(1))
    want = torch.autograd.grad(-lws.log_q_score.mean(dim=(0, 1)).mean(), model.phi_parameters())
    assert_grads_close(gp, want)


def test_get_estimator_alpha():
    assert get_estimator("gdreg").alpha == GDREG_ALPHA
    assert get_estimator("gdreg", 0.2).alpha == 0.2 and ESTIMATORS["gdreg"].alpha == GDREG_ALPHA
    with pytest.raises(ValueError):
        get_estimator("dreg", 0.2)


def test_gdreg_default_alpha_is_one_setting_and_not_half_stl():
    """conf/estimator/gdreg.yaml, train.yaml's diagnostics, snr.yaml, the estimator table and the
    schemas share one default, and it is not 0.5, where gdreg is stl / 2 per draw (which Adam follows as stl)."""
    from omegaconf import OmegaConf
    from vaexp.schema import DiagnosticsConf, SnrConfig
    conf = Path(__file__).resolve().parents[1] / "conf"
    yamls = [OmegaConf.load(conf / "estimator" / "gdreg.yaml").alpha,
             OmegaConf.load(conf / "train.yaml").diagnostics.alpha, OmegaConf.load(conf / "snr.yaml").alpha]
    assert yamls == [GDREG_ALPHA] * 3 and DiagnosticsConf().alpha == SnrConfig().alpha == GDREG_ALPHA
    assert GDREG_ALPHA != 0.5


def test_rws_dreg_norm_with_one_dominant_weight_is_finite():
    """fp32, one weight exp(200) times the others: Σ(w̃ − w̃²) underflows to 0; no NaN, no update."""
    from vaexp.estimators import _per_group_normalised, rws_dreg_weights

    lw = torch.tensor([[[0.0], [-200.0], [-200.0]]])
    r = _per_group_normalised(rws_dreg_weights(make_objective("iwae"), lw))
    assert torch.isfinite(r).all()
