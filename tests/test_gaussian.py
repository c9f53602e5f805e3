"""The estimators against exact answers, on the analytic linear-Gaussian model (vaexp.models.gaussian).

p(z) = N(μ, I), p(x|z) = N(z, I) (and its two-layer chain), q(z_i|z_{i-1}) = N(A z_{i-1} + b, σ²I):
log p(x), the posterior and the ELBO are known in closed form, so the log-weights, the bounds,
the NLL evaluation and the gradient estimators are checked against the truth rather than against
another implementation.

Tolerances. Monte Carlo checks compare an estimate with its known expectation using the estimate's
own standard error (se) from the same draws: |estimate − truth| < 4 se, a false alarm rate of
6e-5 per check, and the seeds are fixed, so a pass is reproducible. Unbiasedness of a gradient
estimator uses the statistic S = n‖mean d‖² / tr(Σ̂) on paired draws d = est − reparam (the
approach of tests/test_estimators.py, whose per-component z-tests were unreliable because the
components are strongly correlated): under E[d] = 0, S is a weighted mean of χ²₁ variables, and
for t ≥ 1.54, P(S > t) ≤ P(χ²₁ > t) (Székely & Bakirov 2003); with n = 16000 draws tr(Σ̂) is
essentially exact, so S_MAX = 16 means p ≤ 6e-5 per block. Deterministic identities (a bound at
the exact posterior, STL/DReG gradients there) are checked to 1e-10 in float64.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch.distributions import MultivariateNormal, Normal

from vaexp.data import load_dataset
from vaexp.estimators import get_estimator, gradients, surrogate_losses
from vaexp.evaluate import evaluate
from vaexp.data.gaussian import load_gaussian, true_mean
from vaexp.models.gaussian import LinearGaussianVAE
from vaexp.models import build_model
from vaexp.objectives import make_objective
from vaexp.snr import GradientSampler

F64 = torch.float64
OBJECTIVES = ["vae", "iwae", "miwae", "ciwae", "piwae"]
ESTIMATORS = ["reparam", "stl", "dreg"]
S_MAX = 16.0

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def m_for(objective: str) -> int:
    return 1 if objective == "iwae" else 2


def generic_model(dim: int = 3, layers: int = 1, seed: int = 0, learn_q_var: bool = True,
                  q_var: float = 1.0) -> LinearGaussianVAE:
    """A point away from the optimum (so biases show), with q wider than the posterior (so the
    importance weights have finite variance), in float64."""
    torch.manual_seed(seed)
    model = LinearGaussianVAE(dim, layers, q_var=q_var, learn_q_var=learn_q_var).double()
    with torch.no_grad():
        model.mu.copy_(torch.randn(dim, dtype=F64))
        for layer in model.encoder:
            layer.A.copy_(0.5 * torch.eye(dim, dtype=F64) + 0.2 * torch.randn(dim, dim, dtype=F64))
            layer.b.copy_(0.3 * torch.randn(dim, dtype=F64))
    return model


def points(dim: int, n: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=F64) * 1.4 + 0.5


def grads(model, x, objective, estimator, m, k, seed):
    obj, est = make_objective(objective, beta=0.3), get_estimator(estimator)
    lws = model.log_weights(x, m, k, need_bar=est.needs_lw_bar, generator=torch.Generator().manual_seed(seed))
    losses = surrogate_losses(obj, est, lws.lw, lws.lw_bar)
    return losses, gradients(losses, model.theta_parameters(), model.phi_parameters())


def flat(gs) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in gs])


# -- the data and the plumbing ------------------------------------------------------------------------

def test_data_are_seeded_split_real_valued_and_from_the_true_model():
    cfg = OmegaConf.create({"name": "gaussian", "dim": 20, "n_train": 1024, "n_valid": 16, "n_test": 64, "seed": 3})
    a, b = load_gaussian("gaussian", cfg, "cpu"), load_dataset(cfg, "cpu")
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    assert a.train.shape == (1024, 20) and a.valid.shape == (16, 20) and a.test.shape == (64, 20)
    assert a.train.dtype == torch.float32 and not a.binary and a.image_shape is None
    # the test set is its own stream: it does not move when the training set grows
    bigger = load_gaussian("gaussian", OmegaConf.merge(cfg, {"n_train": 2000}), "cpu")
    assert torch.equal(bigger.test, a.test) and torch.equal(bigger.train[:1024], a.train)
    assert not torch.equal(load_gaussian("gaussian", OmegaConf.merge(cfg, {"seed": 4}), "cpu").train, a.train)
    # x ~ N(μ_true, 2I): the sample mean is within 4.5 standard errors in every dimension (D = 20)
    se = math.sqrt(2 / 1024)
    assert ((a.train.double().mean(0) - true_mean(20, 3)).abs() < 4.5 * se).all()
    assert abs(a.train.double().var(0).mean().item() - 2.0) < 0.1


def test_build_model_dispatch_and_parameter_split():
    data = load_gaussian("gaussian", OmegaConf.create({"dim": 5, "n_train": 10, "n_valid": 0, "n_test": 3, "seed": 0}), "cpu")
    cfg = OmegaConf.create({"name": "gaussian", "latents": [5, 5], "q_var": 0.5, "learn_q_var": False})
    model = build_model(cfg, data)
    assert isinstance(model, LinearGaussianVAE) and len(model.encoder) == 2
    assert [p.shape for p in model.theta_parameters()] == [(5,)]
    assert [p.shape for p in model.phi_parameters()] == [(5, 5), (5,), (5, 5), (5,)]  # σ fixed: a buffer
    assert "encoder.0.logsig" in model.state_dict()
    learnt = build_model(OmegaConf.merge(cfg, {"learn_q_var": True}), data)
    assert len(learnt.phi_parameters()) == 6


# -- log-weights and the exact answers ------------------------------------------------------------------

def reference_log_weights(model: LinearGaussianVAE, x, m, k, seed):
    """torch.distributions on the same ε draws (layer by layer, [M, K, B, D] each)."""
    g = torch.Generator().manual_seed(seed)
    eps = [torch.randn((m, k) + x.shape, generator=g, dtype=F64) for _ in model.encoder]
    h, log_q, zs = x, 0.0, []
    for layer, e in zip(model.encoder, eps):
        mean = h @ layer.A.T + layer.b
        sd = torch.exp(layer.logsig) * torch.ones_like(mean)
        z = mean + sd * e
        log_q = log_q + Normal(mean, sd).log_prob(z).sum(-1)
        zs.append(z)
        h = z
    log_p = Normal(zs[0], 1.0).log_prob(x).sum(-1)
    for i in range(1, len(zs)):
        log_p = log_p + Normal(zs[i], 1.0).log_prob(zs[i - 1]).sum(-1)
    log_p = log_p + Normal(model.mu, 1.0).log_prob(zs[-1]).sum(-1)
    return log_p - log_q, zs


@pytest.mark.parametrize("layers", [1, 2])
def test_log_weights_match_torch_distributions(layers):
    model, x = generic_model(layers=layers), points(3, 4)
    lws = model.log_weights(x, 2, 5, need_bar=True, generator=torch.Generator().manual_seed(1))
    ref, zs = reference_log_weights(model, x, 2, 5, seed=1)
    assert lws.lw.shape == (2, 5, 4)
    torch.testing.assert_close(lws.lw, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lws.lw_bar, ref, rtol=1e-12, atol=1e-12)  # same values, other gradients
    for z, z_ref in zip(lws.zs, zs):
        torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
    # given draws (the models' shared `eps` argument) give the same log-weights
    g = torch.Generator().manual_seed(1)
    eps = [torch.randn((2, 5, 4, 3), generator=g, dtype=F64) for _ in model.encoder]
    torch.testing.assert_close(model.log_weights(x, 2, 5, eps=eps).lw, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layers", [1, 2])
def test_exact_log_px_and_posterior_satisfy_bayes_rule(layers):
    """log p(x, z) − log p(z | x) = log p(x) for *any* z, and p(x) = N(μ, (L+1)I)."""
    model, x = generic_model(dim=4, layers=layers), points(4, 6)
    exact = model.exact_log_px(x)
    mvn = MultivariateNormal(model.mu.detach(), (layers + 1.0) * torch.eye(4, dtype=F64))
    torch.testing.assert_close(exact, mvn.log_prob(x), rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(2)
    zs = [3 * torch.randn(6, 4, generator=g, dtype=F64) for _ in range(layers)]  # arbitrary, not from q
    log_post, h = 0.0, x
    for z, (A, b, var) in zip(zs, model.exact_posterior()):
        log_post = log_post + Normal(h @ A.T + b, math.sqrt(var)).log_prob(z).sum(-1)
        h = z
    torch.testing.assert_close(model.log_joint(x, zs) - log_post, exact, rtol=1e-10, atol=1e-10)
    if layers == 1:  # the papers' formulas
        (A, b, var), = model.exact_posterior()
        torch.testing.assert_close(A, 0.5 * torch.eye(4, dtype=F64))
        torch.testing.assert_close(b, model.mu.detach() / 2)
        assert var == 0.5


@pytest.mark.parametrize("layers", [1, 2])
def test_elbo_estimate_matches_the_exact_elbo(layers):
    """The mean of the 1-sample bound over many draws is the closed-form ELBO (within 4 se), which
    lies strictly below log p(x)."""
    model, x = generic_model(layers=layers), points(3, 3)
    lw = model.log_weights(x, 40000, 1, generator=torch.Generator().manual_seed(3)).lw.detach()  # [M, 1, B]
    est, se = lw.mean((0, 1)), lw.std((0, 1)) / math.sqrt(40000)
    exact = model.exact_elbo(x)
    assert ((est - exact).abs() < 4 * se).all(), (est, exact, se)
    assert (model.exact_log_px(x) - exact > 0.05).all()


def iwae_gap_constant(model: LinearGaussianVAE, x: torch.Tensor) -> float:
    """ρ = E_q[w²] / p(x)² for one layer, per example, in closed form: w/p(x) = p(z|x)/q(z|x), and
    ∫ N(z; a, u)² / N(z; c, t) dz = √(t/(2α)) / u · exp(β²/(4α) + γ), α = 1/u − 1/(2t),
    β = 2a/u − c/t, γ = c²/(2t) − a²/u, per dimension. Delta method: E[IWAE_K] = log p(x) − (ρ−1)/(2K) + O(K⁻²)."""
    (A, b, u), = model.exact_posterior()
    layer = model.encoder[0]
    a, c = x @ A.T + b, (x @ layer.A.T + layer.b).detach()
    t = float(torch.exp(2 * layer.logsig))
    alpha, beta, gamma = 1 / u - 1 / (2 * t), 2 * a / u - c / t, c ** 2 / (2 * t) - a ** 2 / u
    log_rho = (0.5 * math.log(t / (2 * alpha)) - math.log(u) + beta ** 2 / (4 * alpha) + gamma).sum(-1)
    return torch.exp(log_rho) - 1


def rainforth_model() -> tuple:
    """Rainforth et al.'s model at its optimum (D = 20, σ² = 2/3 fixed) and one training point."""
    data = load_gaussian("gaussian", OmegaConf.create({"dim": 20, "n_train": 1024, "n_valid": 0, "n_test": 200, "seed": 0}), "cpu")
    model = LinearGaussianVAE(20, 1).double()
    model.set_optimum(data.train.double())
    return model, data


def test_bounds_are_below_log_px_and_iwae_climbs_towards_it_as_theory_says():
    model, data = rainforth_model()
    x = data.train[:1].double()
    log_px = model.exact_log_px(x).item()
    rho_1 = iwae_gap_constant(model, x).item()
    assert 0.5 < rho_1 < 2  # ≈ 1.03^20 − 1: a moderate mismatch, so the 1/K regime starts early
    g = torch.Generator().manual_seed(11)
    means, ses = {}, {}
    for k in (1, 4, 16, 64):
        n, chunk = 40000, 4000  # chunks of examples keep the [1, K, n, D] samples small
        bound = torch.cat([make_objective("iwae").theta(model.log_weights(x.expand(chunk, -1), 1, k, generator=g).lw)
                           for _ in range(n // chunk)])
        means[k], ses[k] = bound.mean().item(), bound.std().item() / math.sqrt(n)
        assert means[k] < log_px + 4 * ses[k]
    ks = sorted(means)
    for k_lo, k_hi in zip(ks, ks[1:]):  # strictly increasing, beyond the noise
        assert means[k_hi] - means[k_lo] > 4 * math.hypot(ses[k_hi], ses[k_lo])
    assert log_px - means[64] < (log_px - means[1]) / 20
    # the gap shrinks like (ρ − 1) / (2K): K·gap at K = 64 matches the closed form (4 se, and 5%
    # for the O(1/K²) terms, which are ≈ (ρ−1)/K ≈ 1.5% here)
    k_gap, k_se = 64 * (log_px - means[64]), 64 * ses[64]
    assert abs(k_gap - rho_1 / 2) < 4 * k_se + 0.05 * rho_1 / 2, (k_gap, rho_1 / 2, k_se)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_bound_is_below_log_px_in_expectation(objective):
    model, x = generic_model(layers=2), points(3, 2)
    n = 20000
    lw = model.log_weights(x.repeat(n, 1), 2, 3, generator=torch.Generator().manual_seed(5)).lw.detach()
    obj = make_objective(objective, beta=0.3)
    for fn in (obj.theta, obj.phi):
        b = fn(lw).reshape(n, 2)
        gap = model.exact_log_px(x) - b.mean(0)
        assert (gap > 4 * b.std(0) / math.sqrt(n)).all()  # strictly below: q is not the posterior here


def test_nll_estimate_with_k5000_is_within_monte_carlo_error_of_exact():
    """The evaluation path (vaexp.evaluate.evaluate, as `vaexp train` and `vaexp eval` run it)
    against log N(x; μ, 2I), image by image."""
    model, data = rainforth_model()
    x = data.test[:100].double()
    cfg = OmegaConf.create({"k": 5000, "report_k": [1, 64], "chunk": 0, "n_test": None, "every": 0, "seed": 0,
                            "au_threshold": 0.01, "au_samples": 1})
    result = evaluate(model, x, cfg, torch.device("cpu"))
    out = result["per_example"]
    assert result["metrics"]["active_units"] == [20]  # Cov_x(E_q[z|x]) = Cov(x)/4 ≈ 1/2 per unit
    diff = out["log_px"] - model.exact_log_px(x)
    bias = -(iwae_gap_constant(model, x) / (2 * 5000))  # ≈ -1e-4: far below the tolerance
    se = diff.std() / math.sqrt(len(diff))
    assert abs((diff - bias).mean()) < 4 * se, (diff.mean(), se)
    assert diff.abs().max() < 0.05  # each image's estimate, not just the average
    assert (out["L1"] < out["L64"]).all() and (out["L64"] < model.exact_log_px(x) + 0.05).all()


# -- the exact posterior: zero variance, sticking the landing --------------------------------------

@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_exact_posterior_makes_every_bound_exact_with_zero_variance(objective, layers):
    model, x = generic_model(dim=4, layers=layers), points(4, 3)
    model.set_exact_posterior()
    exact = model.exact_log_px(x)
    obj = make_objective(objective, beta=0.3)
    for seed in range(3):
        lw = model.log_weights(x, 2, 5, generator=torch.Generator().manual_seed(seed)).lw.detach()
        torch.testing.assert_close(lw, exact.expand_as(lw), rtol=0, atol=1e-10)
        torch.testing.assert_close(obj.theta(lw), exact, rtol=0, atol=1e-10)
        torch.testing.assert_close(obj.phi(lw), exact, rtol=0, atol=1e-10)


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_stl_and_dreg_stick_the_landing_reparam_does_not(objective, layers):
    """At q = p(z|x) the STL and DReG φ-gradients are exactly zero for every draw (the path
    derivative of log p(x,z) − log q(z|x) vanishes); reparam keeps the score term's noise. For two
    layers this needs z1 live as the input of q(z2|z1) in lw̄ (see the next test)."""
    model, x = generic_model(dim=4, layers=layers), points(4, 3)
    model.set_exact_posterior()
    m = m_for(objective)
    for seed in range(4):
        for est in ("stl", "dreg"):
            _, (_, g_phi) = grads(model, x, objective, est, m, 5, seed)
            assert flat(g_phi).abs().max() < 1e-10, (est, seed)
        _, (_, g_phi) = grads(model, x, objective, "reparam", m, 5, seed)
        assert flat(g_phi).norm() > 0.1


def test_zero_gradient_check_would_catch_a_detached_z1():
    """The same STL gradient with z1 detached as the input of q(z2|z1) is far from zero: the
    sticking-the-landing test above has the power to find that bug."""
    model, x = generic_model(dim=4, layers=2), points(4, 3)
    model.set_exact_posterior()
    lws = model.log_weights(x, 1, 5, need_bar=True, generator=torch.Generator().manual_seed(0))
    z1, z2 = lws.zs
    from torch.func import functional_call

    from vaexp.models.base import gaussian_log_prob

    def frozen(layer, h):  # the layer with its parameters detached
        return functional_call(layer, {n: p.detach() for n, p in layer.named_parameters()}, (h,))

    l1, l2 = model.encoder
    wrong_log_q = (gaussian_log_prob(z1, *frozen(l1, x))
                   + gaussian_log_prob(z2, *frozen(l2, z1.detach())))
    wrong = model.log_joint(x, lws.zs) - wrong_log_q
    obj = make_objective("iwae")
    g_wrong = torch.autograd.grad(-obj.phi(wrong).mean(), model.phi_parameters(), retain_graph=True)
    g_right = torch.autograd.grad(-obj.phi(lws.lw_bar).mean(), model.phi_parameters())
    assert flat(g_right).abs().max() < 1e-10
    assert flat(g_wrong).norm() > 0.1


# -- estimators: same θ gradient, unbiased DReG, biased STL -------------------------------------------

@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_theta_gradients_identical_across_estimators(objective, layers):
    model, x = generic_model(layers=layers), points(3, 2)
    m = m_for(objective)
    g = [flat(grads(model, x, objective, est, m, 4, seed=9)[1][0]) for est in ESTIMATORS]
    for other in g[1:]:
        torch.testing.assert_close(other, g[0], rtol=0, atol=0)
    assert g[0].norm() > 1e-3


def _S(d: torch.Tensor) -> float:
    """n ‖mean d‖² / tr(Σ̂) over the rows (draws) of d; ≈ χ²₁ or lighter-tailed under E[d] = 0."""
    n = d.shape[0]
    return (n * (d.mean(0) ** 2).sum() / d.var(0).sum()).item()


def _phi_draws(model, x, objective, m, k, n, seed):
    """n paired φ-gradient draws per estimator (same z for all three), via the batched sampler
    (checked draw by draw against the trainer's path in tests/test_snr.py)."""
    sampler = GradientSampler(model, x, make_objective(objective, beta=0.3), [get_estimator(e) for e in ESTIMATORS])
    _, g_phi = sampler.draw(m, k, n, torch.Generator().manual_seed(seed))
    return dict(zip(ESTIMATORS, g_phi)), [p.numel() for p in sampler.phi.values()]


def _blocks(g: torch.Tensor, sizes):
    return torch.split(g, sizes, dim=1)


MC_DRAWS = 16000


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("objective", ["iwae", "miwae", "ciwae"])
def test_dreg_is_unbiased_per_parameter_block(objective, layers):
    """E[DReG] = E[reparam] = ∇φ bound, per φ block (A_i, b_i, log σ_i of every layer); for two
    layers this is the hierarchical case, where z1 must stay live inside q(z2|z1)."""
    model, x = generic_model(layers=layers), points(3, 2)
    g, sizes = _phi_draws(model, x, objective, m_for(objective), 3, MC_DRAWS, seed=21)
    for block_d, block_r in zip(_blocks(g["dreg"] - g["reparam"], sizes), _blocks(g["reparam"], sizes)):
        assert _S(block_d) < S_MAX
        assert _S(block_r) > 4 * S_MAX  # the gradient itself is clearly non-zero: the test has signal


@pytest.mark.parametrize("layers", [1, 2])
def test_stl_is_biased_for_iwae_and_unbiased_for_the_elbo(layers):
    """Tucker et al.: STL drops a term whose mean is zero only for K = 1."""
    model, x = generic_model(layers=layers), points(3, 2)
    g, _ = _phi_draws(model, x, "iwae", 1, 3, MC_DRAWS, seed=22)
    assert _S(g["stl"] - g["reparam"]) > 20 * S_MAX
    assert _S(g["dreg"] - g["reparam"]) < S_MAX
    g, _ = _phi_draws(model, x, "vae", 2, 1, MC_DRAWS, seed=23)
    assert _S(g["stl"] - g["reparam"]) < S_MAX


# -- the model in the trainer and the evaluation, end to end -----------------------------------------

@pytest.mark.parametrize("layers", [1, 2])
def test_train_and_eval_end_to_end(layers, vaexp_main, tmp_path):
    """`vaexp train model=gaussian dataset=gaussian objective=iwae k=64` through the ordinary
    trainer: it learns (μ moves to the data mean), its K=5000 test NLL agrees with the exact NLL
    of the trained model, and `vaexp eval` on the run reproduces it."""
    dim = 20 if layers == 1 else 5
    latents = f"[{','.join([str(dim)] * layers)}]"
    out = tmp_path / "out"
    res = vaexp_main("train", "model=gaussian", "dataset=gaussian", "objective=iwae", "k=64",
                     f"dataset.dim={dim}", f"model.latents={latents}", "schedule=constant", "schedule.epochs=2",
                     "schedule.lr=0.01", "eval.n_test=200", "progress=false", f"out_root={out}")
    assert res.code == 0, res.err
    (run,) = (out / "train").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    test = metrics["test"]
    assert test["active_units"] == [dim] * layers and test["k"] == 5000
    assert test["L1"] < test["L64"] < test["L5000"]
    cfg = OmegaConf.load(run / "config.yaml")
    data = load_dataset(cfg.dataset, "cpu")
    model = build_model(cfg.model, data)
    model.load_state_dict(torch.load(run / "checkpoint.pt", weights_only=False)["model"])
    start = LinearGaussianVAE(dim, layers)
    assert (model.mu - data.train.mean(0)).norm() < 0.5 * (start.mu - data.train.mean(0)).norm()
    per_image = torch.load(run / "test_log_px.pt")["log_px"]
    diff = per_image - model.exact_log_px(data.test[:200])
    # MC error of the estimate plus fp32 log-weights (~1e-5 each): 4 se, or 0.01 nats at least
    assert abs(diff.mean().item()) < max(4 * diff.std().item() / math.sqrt(200), 0.01), diff.mean()
    assert abs(test["nll"] + model.exact_log_px(data.test[:200]).mean().item()) < 0.05
    res = vaexp_main("eval", str(run), "eval.n_test=200", "progress=false")
    assert res.code == 0, res.err
    again = json.loads((run / "metrics.json").read_text())["test"]
    assert again["nll"] == test["nll"]


# -- the rest of the family on the analytic model: means against known-unbiased estimators --------------
#
# Every check pairs draws (one draw feeds every estimator) and applies S to the difference; S_MAX as
# above. "Biased" checks ask for S > 4·S_MAX or 20·S_MAX (P ≪ 1e-10 under no bias), so a pass is no
# accident either.

def _draws(model, x, objective, m, k, names, n=MC_DRAWS, seed=31, alpha=0.5):
    ests = [get_estimator(e, alpha if e == "gdreg" else None) for e in names]
    sampler = GradientSampler(model, x, make_objective(objective, beta=0.3), ests)
    _, g_phi = sampler.draw(m, k, n, torch.Generator().manual_seed(seed))
    return dict(zip(names, g_phi))


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("objective", ["iwae", "miwae", "jvi"])
def test_rws_dreg_has_the_mean_of_rws(objective, layers):
    """Tucker et al.: E[Σ (w̃ − w̃²) ∂lw̄/∂φ] = E[Σ w̃ ∇φ log q(z̄)]; both estimate another quantity
    than ∇φ of the bound (the inclusive-KL direction), so they are biased against reparam."""
    model, x = generic_model(layers=layers), points(3, 2)
    g = _draws(model, x, objective, m_for(objective), 3, ["reparam", "rws", "rws_dreg"], seed=32 + layers)
    assert _S(g["rws_dreg"] - g["rws"]) < S_MAX
    assert _S(g["rws"]) > 4 * S_MAX  # a non-zero mean: the check has signal
    assert _S(g["rws"] - g["reparam"]) > 4 * S_MAX


@pytest.mark.parametrize("alpha", [0.25, 0.5])
def test_gdreg_interpolates_between_the_bound_gradient_and_rws(alpha):
    """E[gdreg(α)] = (1 − α)·∇φ bound + α·E[rws]: against reparam and rws, not against its own parts."""
    model, x = generic_model(layers=2), points(3, 2)
    g = _draws(model, x, "miwae", 2, 3, ["reparam", "rws", "gdreg"], seed=35, alpha=alpha)
    assert _S(g["gdreg"] - ((1 - alpha) * g["reparam"] + alpha * g["rws"])) < S_MAX
    assert _S(g["gdreg"] - g["reparam"]) > 20 * S_MAX and _S(g["gdreg"] - g["rws"]) > 20 * S_MAX


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("objective,k", [("iwae", 3), ("miwae", 3), ("piwae", 3), ("jvi", 3)])
def test_vimco_is_unbiased_for_the_bound(objective, k, layers):
    """The score function with leave-one-out baselines has the mean of the reparameterisation
    gradient of the same φ bound (Mnih & Rezende): z is not reparameterised, but E is the same."""
    model, x = generic_model(layers=layers), points(3, 2)
    g = _draws(model, x, objective, m_for(objective), k, ["reparam", "vimco"], seed=40 + layers)
    assert _S(g["vimco"] - g["reparam"]) < S_MAX
    assert _S(g["reparam"]) > 4 * S_MAX


@pytest.mark.parametrize("layers", [1, 2])
def test_jvi_dreg_has_the_mean_of_jvi_reparam_and_stl_does_not(layers):
    """JVI-DReG (jk-dreg): the closed-form weights K·w̃² − (K−1)·mean_j (w̃^(−j))² are unbiased for
    ∇φ of the JVI estimate; STL on jvi drops a score term with non-zero mean."""
    model, x = generic_model(layers=layers), points(3, 2)
    g = _draws(model, x, "jvi", 2, 3, ["reparam", "stl", "dreg"], seed=45 + layers)
    assert _S(g["dreg"] - g["reparam"]) < S_MAX
    assert _S(g["reparam"]) > 4 * S_MAX
    assert _S(g["stl"] - g["reparam"]) > 20 * S_MAX


def test_the_known_biases_show():
    """dreg_norm (w̃²/Σw̃²) is biased for ∇φ IWAE, rws_dreg_norm for rws' mean; stl on iwae (also
    above) with the same draws."""
    model, x = generic_model(layers=1), points(3, 2)
    g = _draws(model, x, "iwae", 1, 3, ["reparam", "stl", "dreg", "dreg_norm", "rws", "rws_dreg_norm"], seed=50)
    assert _S(g["dreg"] - g["reparam"]) < S_MAX
    assert _S(g["dreg_norm"] - g["reparam"]) > 20 * S_MAX
    assert _S(g["stl"] - g["reparam"]) > 20 * S_MAX
    assert _S(g["rws_dreg_norm"] - g["rws"]) > 20 * S_MAX


def test_rws_at_k1_has_mean_zero():
    """K = 1: rws is the score ∇φ log q(z̄|x), whose expectation is 0 (why the CLI refuses it)."""
    model, x = generic_model(layers=2), points(3, 2)
    g = _draws(model, x, "miwae", 2, 1, ["reparam", "rws"], seed=55)
    assert _S(g["rws"]) < S_MAX
    assert _S(g["reparam"]) > 4 * S_MAX


def test_jvi_estimate_has_a_smaller_bias_than_iwae():
    """Nowozin 2018: E[IWAE_K] = log p(x) − (ρ−1)/(2K) + O(1/K²); the first-order jackknife removes
    the 1/K term, so at K = 4 the JVI estimate's gap is a fraction of IWAE's (within 4 se)."""
    model, data = rainforth_model()
    x = data.train[:1].double()
    log_px = model.exact_log_px(x).item()
    g = torch.Generator().manual_seed(12)
    lw = torch.cat([model.log_weights(x.expand(4000, -1), 1, 4, generator=g).lw for _ in range(10)], dim=2)
    gaps = {}
    for name in ("iwae", "jvi"):
        v = make_objective(name).theta(lw)
        gaps[name] = (log_px - v.mean().item(), v.std().item() / math.sqrt(v.numel()))
    iwae_gap, iwae_se = gaps["iwae"]
    jvi_gap, jvi_se = gaps["jvi"]
    assert iwae_gap > 4 * iwae_se  # the O(1/K) bias is resolved
    assert abs(jvi_gap) < iwae_gap / 3 + 4 * jvi_se, gaps
