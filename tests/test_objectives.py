"""The bounds of vaexp.objectives, checked against values computed by hand (plain Python), known
identities, orderings, fp32 extremes and DReG weights obtained by autograd (double backward)."""
from __future__ import annotations

import math

import pytest
import torch

from vaexp.objectives import logmeanexp, make_objective

BETA = 0.3
OBJECTIVES = ["vae", "iwae", "miwae", "ciwae", "piwae"]

# A hand-made lw[M=2, K=3, B=2]: lw[m][k][b].
LW = [
    [[-1.0, -5.0], [-2.0, -3.0], [-4.0, -0.5]],
    [[-3.0, -2.5], [-0.2, -7.0], [-6.0, -1.5]],
]
M, K, B = 2, 3, 2


def lw_tensor(dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(LW, dtype=dtype)


# -- references in plain Python ------------------------------------------------------------------

def py_lme(xs):
    """log(mean(exp(xs))) the schoolbook way (the values used here are moderate)."""
    return math.log(sum(math.exp(x) for x in xs) / len(xs))


def py_vae(lw, b):
    return sum(lw[m][k][b] for m in range(len(lw)) for k in range(len(lw[0]))) / (len(lw) * len(lw[0]))


def py_miwae(lw, b):
    return sum(py_lme([lw[m][k][b] for k in range(len(lw[0]))]) for m in range(len(lw))) / len(lw)


def py_flat(lw, b):
    return py_lme([lw[m][k][b] for m in range(len(lw)) for k in range(len(lw[0]))])


def expected_theta(name, lw, b, beta=BETA):
    if name == "vae":
        return py_vae(lw, b)
    if name in ("iwae", "miwae"):
        return py_miwae(lw, b)
    if name == "ciwae":
        return beta * py_vae(lw, b) + (1 - beta) * py_miwae(lw, b)
    if name == "piwae":
        return py_flat(lw, b)
    raise AssertionError(name)


def expected_phi(name, lw, b, beta=BETA):
    return py_miwae(lw, b) if name == "piwae" else expected_theta(name, lw, b, beta)


def rand_lw(m, k, b, seed=0, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(m, k, b, generator=g, dtype=dtype) - 2.0


def close(a, b, rtol=1e-12, atol=1e-12):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# -- exact values ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", OBJECTIVES)
def test_exact_values_on_hand_made_log_weights(name):
    obj = make_objective(name, beta=BETA)
    lw = lw_tensor()
    theta, phi = obj.theta(lw), obj.phi(lw)
    assert theta.shape == (B,) and phi.shape == (B,)
    for b in range(B):
        assert theta[b].item() == pytest.approx(expected_theta(name, LW, b), rel=1e-13, abs=1e-13)
        assert phi[b].item() == pytest.approx(expected_phi(name, LW, b), rel=1e-13, abs=1e-13)


def test_hand_values_spelled_out():
    """A few numbers written out, so the reference helpers above are checked too."""
    lw = lw_tensor()
    # example b=0: vae = mean(-1,-2,-4,-3,-0.2,-6) = -16.2/6
    assert make_objective("vae").theta(lw)[0].item() == pytest.approx(-16.2 / 6, rel=1e-14)
    # miwae, b=0: m=0 -> log((e^-1+e^-2+e^-4)/3), m=1 -> log((e^-3+e^-0.2+e^-6)/3)
    m0 = math.log((math.exp(-1) + math.exp(-2) + math.exp(-4)) / 3)
    m1 = math.log((math.exp(-3) + math.exp(-0.2) + math.exp(-6)) / 3)
    assert make_objective("miwae").theta(lw)[0].item() == pytest.approx((m0 + m1) / 2, rel=1e-14)
    # piwae θ, b=1: log-mean-exp of all six log-weights of example 1
    six = [-5.0, -3.0, -0.5, -2.5, -7.0, -1.5]
    flat = math.log(sum(math.exp(v) for v in six) / 6)
    assert make_objective("piwae").theta(lw)[1].item() == pytest.approx(flat, rel=1e-14)
    assert make_objective("piwae").phi(lw)[1].item() == pytest.approx(py_miwae(LW, 1), rel=1e-14)


def test_split_flag_only_for_piwae():
    for name in OBJECTIVES:
        assert make_objective(name, beta=BETA).split == (name == "piwae")


def test_unknown_objective_rejected():
    with pytest.raises(ValueError):
        make_objective("elbo2000")


def test_logmeanexp_tuple_and_int_dims():
    lw = rand_lw(3, 4, 2)
    close(logmeanexp(lw, 1), torch.log(torch.exp(lw).mean(1)))
    close(logmeanexp(lw, (0, 1)), torch.log(torch.exp(lw).mean((0, 1))))


# -- identities --------------------------------------------------------------------------------

def test_vae_over_mk_equals_miwae_with_k1():
    lw = rand_lw(3, 4, 5)
    flat = lw.reshape(12, 1, 5)  # the same 12 samples, all outside the log
    close(make_objective("vae").theta(lw), make_objective("miwae").theta(flat))
    close(make_objective("vae").theta(lw), lw.mean((0, 1)))


def test_iwae_equals_miwae_with_m1_and_flat_iwae():
    lw = rand_lw(1, 6, 4)
    iwae = make_objective("iwae").theta(lw)
    close(iwae, make_objective("miwae").theta(lw))
    close(iwae, torch.log(torch.exp(lw).mean(1))[0])


@pytest.mark.parametrize("m", [1, 3])
def test_ciwae_endpoints(m):
    lw = rand_lw(m, 4, 3, seed=1)
    close(make_objective("ciwae", beta=1.0).theta(lw), make_objective("vae").theta(lw))
    close(make_objective("ciwae", beta=0.0).theta(lw), make_objective("miwae").theta(lw))
    close(make_objective("ciwae", beta=0.0).dreg_weights(lw), make_objective("miwae").dreg_weights(lw))
    close(make_objective("ciwae", beta=1.0).dreg_weights(lw), make_objective("vae").dreg_weights(lw))
    if m == 1:
        close(make_objective("ciwae", beta=0.0).theta(lw), make_objective("iwae").theta(lw))


def test_ciwae_is_linear_in_beta():
    lw = rand_lw(2, 4, 3, seed=2)
    v, mi = make_objective("vae").theta(lw), make_objective("miwae").theta(lw)
    for beta in (0.0, 0.25, 0.7, 1.0):
        close(make_objective("ciwae", beta=beta).theta(lw), beta * v + (1 - beta) * mi)


def test_piwae_with_m1_is_iwae():
    lw = rand_lw(1, 5, 3, seed=3)
    p, i = make_objective("piwae"), make_objective("iwae")
    close(p.theta(lw), i.theta(lw))
    close(p.phi(lw), i.theta(lw))
    close(p.dreg_weights(lw), i.dreg_weights(lw))


def test_piwae_with_m_gt_1_theta_and_phi_differ():
    lw = rand_lw(3, 2, 4, seed=4)
    p = make_objective("piwae")
    # θ bound ≥ φ bound (flat iwae over M·K ≥ miwae), strictly for generic lw
    assert torch.all(p.theta(lw) > p.phi(lw) + 1e-6)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_single_sample_all_bounds_equal_the_log_weight(name):
    lw = rand_lw(1, 1, 4, seed=5)
    obj = make_objective(name, beta=BETA)
    close(obj.theta(lw), lw[0, 0])
    close(obj.phi(lw), lw[0, 0])
    close(obj.dreg_weights(lw), torch.ones_like(lw))


# -- orderings ---------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_ordering_vae_le_miwae_le_flat_iwae(seed):
    lw = rand_lw(3, 4, 8, seed=seed)
    vae = make_objective("vae").theta(lw)
    miwae = make_objective("miwae").theta(lw)
    flat = make_objective("piwae").theta(lw)
    # Jensen, strict for non-constant lw
    assert torch.all(vae < miwae)
    assert torch.all(miwae < flat)
    for beta in (0.1, 0.5, 0.9):
        c = make_objective("ciwae", beta=beta).theta(lw)
        assert torch.all(vae < c) and torch.all(c < miwae)


# -- fp32 stability ----------------------------------------------------------------------------

@pytest.mark.parametrize("offset", [-1000.0, 100.0])
@pytest.mark.parametrize("name", OBJECTIVES)
def test_fp32_extreme_log_weights(name, offset):
    lw64 = offset + rand_lw(2, 5, 3, seed=6, scale=2.0) + 2.0
    lw32 = lw64.float()
    naive = torch.log(torch.exp(lw32).mean(1))
    assert not torch.isfinite(naive).any()  # what a non-max-subtracted version would give
    obj = make_objective(name, beta=BETA)
    for f in (obj.theta, obj.phi):
        v32 = f(lw32)
        assert v32.dtype == torch.float32 and torch.isfinite(v32).all()
        # fp32 ulp at |x|≈1000 is 6e-5: compare at fp32 precision with the fp64 result
        torch.testing.assert_close(v32.double(), f(lw64), rtol=1e-6, atol=1e-4)
    c32 = obj.dreg_weights(lw32)
    assert torch.isfinite(c32).all()
    torch.testing.assert_close(c32.double(), obj.dreg_weights(lw64), rtol=1e-4, atol=1e-6)
    # and the gradient of the bound is finite too
    x = lw32.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(obj.phi(x).sum(), x)
    assert torch.isfinite(g).all()


# -- M and K axes --------------------------------------------------------------------------------

def test_m_and_k_axes_not_swapped():
    # lw[M=2, K=3, B=1]; row m=0 has one huge weight, row m=1 is flat
    lw = torch.tensor([[[0.0], [-20.0], [-20.0]],
                       [[-5.0], [-5.0], [-5.0]]], dtype=torch.float64)
    right = 0.5 * (math.log((1 + 2 * math.exp(-20)) / 3) + (-5.0))
    # the value if M and K were swapped: mean over K of logmeanexp over M
    wrong = sum(math.log((math.exp(lw[0, k, 0].item()) + math.exp(lw[1, k, 0].item())) / 2)
                for k in range(3)) / 3
    assert abs(right - wrong) > 0.5
    got = make_objective("miwae").theta(lw)[0].item()
    assert got == pytest.approx(right, rel=1e-13)
    # DReG weights too: normalised over K within each m, divided by M
    c = make_objective("miwae").dreg_weights(lw)[:, :, 0]
    w0 = torch.tensor([1.0, math.exp(-20), math.exp(-20)], dtype=torch.float64)
    w0 = w0 / w0.sum()
    close(c[0], w0 ** 2 / 2)
    close(c[1], torch.full((3,), (1 / 3) ** 2 / 2, dtype=torch.float64))


# -- DReG weights against autograd ----------------------------------------------------------------

def autograd_dreg_weights(phi, lw):
    """c = g - ∂g_k/∂lw_k with g = ∂phi/∂lw, by double backward, one entry at a time."""
    x = lw.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(phi(x).sum(), x, create_graph=True)  # examples are independent
    diag = torch.zeros_like(x)
    if not g.requires_grad:  # g does not depend on lw (a plain mean): ∂g/∂lw = 0
        return g.detach(), g.detach()
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in x.shape]).tolist():
        (h,) = torch.autograd.grad(g[tuple(idx)], x, retain_graph=True)
        diag[tuple(idx)] = h[tuple(idx)]
    return (g - diag).detach(), g.detach()


@pytest.mark.parametrize("shape", [(1, 4, 3), (2, 3, 2), (3, 1, 2)])
@pytest.mark.parametrize("name", OBJECTIVES)
def test_dreg_weights_match_double_backward(name, shape):
    obj = make_objective(name, beta=BETA)
    lw = rand_lw(*shape, seed=7)
    c_auto, _ = autograd_dreg_weights(obj.phi, lw)
    c = obj.dreg_weights(lw)
    assert c.shape == lw.shape
    close(c, c_auto)
    assert torch.all(c >= 0)


def test_dreg_weights_closed_forms():
    lw = rand_lw(2, 4, 3, seed=8)
    m, k = lw.shape[:2]
    close(make_objective("vae").dreg_weights(lw), torch.full_like(lw, 1 / (m * k)))
    wt = torch.softmax(lw, dim=1)  # normalised over K, per m and example
    close(make_objective("miwae").dreg_weights(lw), wt ** 2 / m)
    close(make_objective("ciwae", beta=BETA).dreg_weights(lw),
          BETA / (m * k) + (1 - BETA) * wt ** 2 / m)
    # piwae's φ bound is miwae, so its weights are miwae's (not the flat iwae's)
    close(make_objective("piwae").dreg_weights(lw), wt ** 2 / m)
    flat_wt = torch.softmax(lw.reshape(m * k, -1), 0).reshape(lw.shape)
    assert (make_objective("piwae").dreg_weights(lw) - flat_wt ** 2).abs().max() > 1e-3


def test_dreg_weight_totals():
    lw = rand_lw(2, 4, 3, seed=9)
    # vae: the weights sum to 1 over all M·K (the mean's coefficients)
    close(make_objective("vae").dreg_weights(lw).sum((0, 1)), torch.ones(3, dtype=torch.float64))
    # iwae (M=1): Σ_k w̃_k² ∈ [1/K, 1], and strictly less than Σ g_k = 1 for unequal weights
    lw1 = lw[:1]
    c = make_objective("iwae").dreg_weights(lw1)
    tot = c.sum((0, 1))
    assert torch.all(tot >= 1 / 4 - 1e-15) and torch.all(tot < 1)
    close(tot, (torch.softmax(lw1, 1) ** 2).sum((0, 1)))
    # g sums to 1 for every non-split objective (each is a convex combination of normalised means)
    for name in ("vae", "iwae", "miwae", "ciwae", "piwae"):
        _, g = autograd_dreg_weights(make_objective(name, beta=BETA).phi, lw)
        close(g.sum((0, 1)), torch.ones(3, dtype=torch.float64))


# -- jvi: jackknife variational inference (Nowozin 2018), first order ----------------------------

def py_jvi(lw, b):
    """Per m: K·L_K − (K−1)/K · Σ_j L_{K−1}^(−j), the leave-one-out log-mean-exps spelled out;
    mean over m."""
    out = 0.0
    for m in range(len(lw)):
        xs = [lw[m][k][b] for k in range(len(lw[0]))]
        n = len(xs)
        loo = [py_lme(xs[:j] + xs[j + 1:]) for j in range(n)]
        out += n * py_lme(xs) - (n - 1) / n * sum(loo)
    return out / len(lw)


def test_jvi_exact_values_on_hand_made_log_weights():
    obj = make_objective("jvi")
    lw = lw_tensor()
    assert not obj.split and obj.quantity == "JVI estimate" and obj.slug == "jvi_estimate"
    assert not obj.convex
    for b in range(B):
        assert obj.theta(lw)[b].item() == pytest.approx(py_jvi(LW, b), rel=1e-13, abs=1e-13)
        assert obj.phi(lw)[b].item() == pytest.approx(py_jvi(LW, b), rel=1e-13, abs=1e-13)


def test_jvi_k2_spelled_out():
    """K = 2: 2·log((e^a + e^b)/2) − (a + b)/2 (each leave-one-out term is the other sample)."""
    a, b = -1.0, -4.0
    lw = torch.tensor([[[a], [b]]], dtype=torch.float64)
    want = 2 * math.log((math.exp(a) + math.exp(b)) / 2) - (a + b) / 2
    assert make_objective("jvi").theta(lw)[0].item() == pytest.approx(want, rel=1e-14)
    # it is not a lower bound of the iwae kind: it exceeds the K = 2 iwae bound here
    assert make_objective("jvi").theta(lw)[0] > make_objective("iwae").theta(lw)[0]


def test_jvi_with_k1_is_the_elbo():
    """The documented reduction: with K = 1 the correction has weight K − 1 = 0, so jvi = L_1."""
    lw = rand_lw(3, 1, 4, seed=10)
    jvi = make_objective("jvi")
    close(jvi.theta(lw), make_objective("vae").theta(lw))
    close(jvi.dreg_weights(lw), make_objective("vae").dreg_weights(lw))


def test_jvi_removes_the_first_order_bias_of_iwae():
    """Constant log-weights give their value exactly. For lw = ε·x, lme(ε x) = ε x̄ + ε² s²/2 +
    O(ε³) with s² the 1/K (biased) variance over the K samples, whose expectation is (1 − 1/K)
    σ²: the O(1/K) bias of IWAE. The jackknife K·s²_K − (K−1)·mean_j s²_{K−1} is the unbiased
    (1/(K−1)) variance, so jvi = ε x̄ + ε² var_unbiased/2 + O(ε³): that closed form to 1e-9."""
    c = torch.full((1, 5, 2), -3.0, dtype=torch.float64)
    close(make_objective("jvi").theta(c), torch.full((2,), -3.0, dtype=torch.float64))
    # second order in ε: lme(ε x) = ε x̄ + ε² s²/2 (s² the population variance over K), and the
    # jackknife's K·s²_K − (K−1)·mean s²_{K−1} = the unbiased variance: a closed form to 1e-9
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 6, 3, generator=g, dtype=torch.float64)
    eps = 1e-3
    got = make_objective("jvi").theta(eps * x)
    want = eps * x.mean(1)[0] + eps ** 2 * x.var(1, unbiased=True)[0] / 2
    close(got, want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("shape", [(1, 4, 3), (2, 3, 2), (2, 2, 2)])
def test_jvi_dreg_weights_match_double_backward(shape):
    obj = make_objective("jvi")
    lw = rand_lw(*shape, seed=12)
    c_auto, g = autograd_dreg_weights(obj.phi, lw)
    close(obj.dreg_weights(lw), c_auto)
    # g sums to 1 per group over K: K·1 − (K−1)/K·K·1 = 1, then the mean over M
    close(g.sum((0, 1)), torch.ones(shape[2], dtype=torch.float64))


@pytest.mark.parametrize("offset", [-1000.0, 100.0])
def test_jvi_fp32_extreme_log_weights(offset):
    """Finite, and equal to the fp64 computation on the same (fp32-rounded) inputs up to fp32
    arithmetic: K·L_K − (K−1)·mean L_{K−1} and K·w̃² − (K−1)·mean (w̃^(−j))² nearly cancel, so the
    tolerance is on the scale of the terms (K·|lw|·ulp), not of the result."""
    lw32 = (offset + rand_lw(2, 5, 3, seed=6, scale=2.0) + 2.0).float()
    lw64 = lw32.double()
    obj = make_objective("jvi")
    v32 = obj.theta(lw32)
    assert torch.isfinite(v32).all()
    torch.testing.assert_close(v32.double(), obj.theta(lw64), rtol=0, atol=5 * abs(offset) * 1.2e-7 * 4)
    c32 = obj.dreg_weights(lw32)
    assert torch.isfinite(c32).all()
    torch.testing.assert_close(c32.double(), obj.dreg_weights(lw64), rtol=0, atol=5 * 1.2e-7 * 8)
