"""ELBO surgery (vaexp.surgery): the decomposition avgKL = I(x;z) + KL(q(z)||p(z)), checked on
models whose answers are known, against closed forms and independent Monte Carlo references."""
from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal, kl_divergence

from vaexp.evaluate import evaluate, format_table
from vaexp.models.burda import VAE
from vaexp.surgery import elbo_surgery, log_aggregate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def model(latents=(3,), hidden=(8,), seed=0) -> VAE:
    torch.manual_seed(seed)
    return VAE(list(latents), list(hidden))


def images(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, 784), 0.3), generator=g)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def set_encoder(m: VAE, mu: torch.Tensor, logsig: torch.Tensor) -> None:
    """Make q(z1|x_n) = N(mu[n], exp(logsig[n])^2) for the one-hot inputs x_n = e_n."""
    layer = m.encoder[0]
    with torch.no_grad():
        for lin in layer.net:
            if isinstance(lin, torch.nn.Linear):  # identity-ish: pass the one-hot through tanh layers
                lin.weight.zero_()
                lin.bias.zero_()
                n = mu.shape[0]
                lin.weight[:n, :n] = 10 * torch.eye(n)
        h = torch.tanh(torch.tensor(10.0))
        layer.mu.weight.zero_()
        layer.logsig.weight.zero_()
        layer.mu.weight[:, : mu.shape[0]] = (mu / h).T
        layer.logsig.weight[:, : mu.shape[0]] = (logsig / h).T
        layer.mu.bias.zero_()
        layer.logsig.bias.zero_()


def one_hot(n: int) -> torch.Tensor:
    x = torch.zeros(n, 784)
    x[torch.arange(n), torch.arange(n)] = 1.0
    return x


def test_identity_holds_and_kl_matches_the_closed_form():
    m, x = model(), images(40)
    r = elbo_surgery(m, x, 8, gen())
    assert r["avg_kl"] == pytest.approx(r["mutual_info"] + r["marginal_kl"], abs=1e-10)
    with torch.no_grad():
        mu, logsig = m.encoder[0](x)
    kl = kl_divergence(Normal(mu.double(), logsig.double().exp()), Normal(0.0, 1.0)).sum(-1).mean()
    assert r["avg_kl"] == pytest.approx(float(kl), rel=1e-6)  # one layer: avgKL is exact
    assert 0.0 <= r["mutual_info"] <= math.log(40) + 1e-12
    assert r["marginal_kl"] >= 0.0
    assert r["surgery_n"] == 40 and r["mutual_info_max"] == pytest.approx(math.log(40))


def test_identical_posteriors_carry_no_information():
    m = model()
    with torch.no_grad():  # q(z|x) ignores x: every q(z|x_n) is the same Gaussian
        m.encoder[0].mu.weight.zero_()
        m.encoder[0].logsig.weight.zero_()
        m.encoder[0].mu.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
        m.encoder[0].logsig.bias.copy_(torch.tensor([-0.3, 0.2, 0.0]))
    r = elbo_surgery(m, images(30), 5, gen())
    assert abs(r["mutual_info"]) < 1e-9
    assert r["marginal_kl"] == pytest.approx(r["avg_kl"], abs=1e-9)


def test_separated_posteriors_reach_log_n():
    n = 6
    m = model(hidden=(16,))
    mu = 20.0 * torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)   # far apart
    set_encoder(m, mu, torch.full((n, 3), math.log(0.05)))
    r = elbo_surgery(m, one_hot(n), 4, gen())
    assert r["mutual_info"] == pytest.approx(math.log(n), abs=1e-6)


def test_marginal_kl_agrees_with_an_independent_mixture_estimate():
    """KL(q(z)||p(z)) against plain Monte Carlo with torch's own mixture distribution."""
    n = 4
    m = model(hidden=(16,))
    mu = torch.tensor([[0.0, 1.0, -1.0], [1.5, 0.0, 0.5], [-1.0, -1.0, 0.0], [0.3, 2.0, 1.0]])
    logsig = torch.log(torch.tensor([[0.5, 0.8, 1.0], [0.7, 0.4, 0.6], [1.2, 0.9, 0.5], [0.6, 0.6, 0.6]]))
    set_encoder(m, mu, logsig)
    x = one_hot(n)
    with torch.no_grad():
        mu_x, logsig_x = m.encoder[0](x)
    assert torch.allclose(mu_x, mu, atol=1e-4) and torch.allclose(logsig_x, logsig, atol=1e-4)
    r = elbo_surgery(m, x, 20000, gen(3))
    mix = MixtureSameFamily(Categorical(torch.ones(n, dtype=torch.float64)),
                            Independent(Normal(mu_x.double(), logsig_x.double().exp()), 1))
    torch.manual_seed(7)
    z = mix.sample((200000,))
    prior = Independent(Normal(torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)), 1)
    ref = (mix.log_prob(z) - prior.log_prob(z)).mean()
    # both estimates are Monte Carlo: ~1e-2 standard error at these sample sizes
    assert r["marginal_kl"] == pytest.approx(float(ref), abs=0.03)
    # and the closed-form avgKL splits into the two parts
    kl = kl_divergence(Normal(mu_x.double(), logsig_x.double().exp()), Normal(0.0, 1.0)).sum(-1).mean()
    assert r["mutual_info"] == pytest.approx(float(kl) - float(ref), abs=0.03)


def test_log_aggregate_matches_torch_and_does_not_depend_on_chunks():
    g = gen(5)
    mu, logsig, z = torch.randn(7, 4, generator=g), 0.3 * torch.randn(7, 4, generator=g), torch.randn(50, 4, generator=g)
    mix = MixtureSameFamily(Categorical(torch.ones(7, dtype=torch.float64)),
                            Independent(Normal(mu.double(), logsig.double().exp()), 1))
    ref = mix.log_prob(z.double())
    assert torch.allclose(log_aggregate(z, mu, logsig), ref, atol=1e-10)
    assert torch.allclose(log_aggregate(z, mu, logsig, chunk_entries=7 * 3), ref, atol=1e-10)


def test_recon_minus_kl_is_the_elbo():
    m, x = model(), images(25)
    r = elbo_surgery(m, x, 400, gen())
    with torch.no_grad():
        elbo = m.log_weights(x, 1, 4000, generator=gen(9)).lw.double().mean()
    assert r["recon"] - r["avg_kl"] == pytest.approx(float(elbo), abs=0.2)


def test_two_layers_identity_and_information_in_the_first_layer():
    m, x = model(latents=(4, 3), hidden=(8, 6)), images(30)
    r = elbo_surgery(m, x, 10, gen())
    assert r["avg_kl"] == pytest.approx(r["mutual_info"] + r["marginal_kl"], abs=1e-10)
    assert 0.0 <= r["mutual_info"] <= math.log(30)
    # the ELBO identity holds for the joint latent (z1, z2): recon - avgKL = E[lw]
    r_many = elbo_surgery(m, x, 400, gen())
    with torch.no_grad():
        elbo = m.log_weights(x, 1, 4000, generator=gen(9)).lw.double().mean()
    assert r_many["recon"] - r_many["avg_kl"] == pytest.approx(float(elbo), abs=0.3)
    # I(x; z1, z2) = I(x; z1): changing q(z2|z1) leaves it unchanged (same draws of z1), not avgKL
    with torch.no_grad():
        for p in m.encoder[1].parameters():
            p.add_(0.5)
    r2 = elbo_surgery(m, x, 10, gen())
    assert r2["mutual_info"] == pytest.approx(r["mutual_info"], abs=1e-12)
    assert r2["avg_kl"] != pytest.approx(r["avg_kl"], abs=1e-6)


def test_seeded_and_deterministic():
    m, x = model(), images(20)
    assert elbo_surgery(m, x, 5, gen(1)) == elbo_surgery(m, x, 5, gen(1))


class _EvalCfg:
    k, report_k, chunk, n_test, seed, au_threshold, au_samples = 20, [1], 0, None, 0, 0.01, 4
    surgery_n, surgery_samples = 12, 3


def test_evaluate_reports_surgery_and_can_turn_it_off():
    m, x = model(), images(30)
    res = evaluate(m, x, _EvalCfg(), torch.device("cpu"))["metrics"]
    assert res["surgery_n"] == 12 and res["surgery_samples"] == 3
    direct = elbo_surgery(m, x[:12], 3, torch.Generator().manual_seed(_EvalCfg.seed + 2))
    assert res["mutual_info"] == direct["mutual_info"] and res["avg_kl"] == direct["avg_kl"]
    assert "ELBO surgery" in format_table(res) and "I(x;z)" in format_table(res)
    off = _EvalCfg()
    off.surgery_n = 0
    res = evaluate(m, x, off, torch.device("cpu"))["metrics"]
    assert "avg_kl" not in res and "ELBO surgery" not in format_table(res)


def test_an_unresolved_posterior_gives_nan_with_a_warning_not_a_number():
    """σ far below what float32 resolves at |μ| (as after a divergence): the draws lose σε and the
    aggregate's expansion cancels, so I(x;z) came out as -3.7e50; NaN and one warning instead."""
    n = 6
    m, x = model(), one_hot(n)
    mu = torch.linspace(1.0, 3.0, n)[:, None].expand(n, 3).contiguous()
    set_encoder(m, mu, torch.full((n, 3), -20.0))          # σ = 2e-9 at |μ| >= 1
    with pytest.warns(RuntimeWarning, match="narrower than float32 resolves"):
        r = elbo_surgery(m, x, 4, gen())
    assert math.isnan(r["mutual_info"]) and math.isnan(r["marginal_kl"]) and math.isfinite(r["avg_kl"])
    set_encoder(m, mu, torch.full((n, 3), -3.0))           # σ = 0.05: resolved, a number within its bound
    r = elbo_surgery(m, x, 4, gen())
    assert math.isfinite(r["mutual_info"]) and r["mutual_info"] <= math.log(n) + 1e-9
