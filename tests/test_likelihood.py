"""The fused Bernoulli likelihood (vaexp.models.likelihood) against the plain formula: values and
gradients on hand-made and random logits, through burda1/burda2, stacked models, DReG's second
backward pass and the evaluation; the fallbacks (no compiler, a kernel that fails its check,
torch.func transforms, small calls)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from vaexp import evaluate as ev
from vaexp.estimators import get_estimator, gradients, surrogate_losses
from vaexp.models import likelihood as L
from vaexp.models.burda import VAE
from vaexp.models.stacked import StackedVAE
from vaexp.objectives import make_objective

pytestmark = pytest.mark.usefixtures("one_torch_thread")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def compiler():
    """Skip where torch.compile does not work here (then vaexp uses the plain formula, tested below)."""
    if L._kernels(torch.device("cpu")) is None:
        pytest.skip("torch.compile does not work on this machine")


def reference(x, logits):
    """The definition in float64: Σ_d x_d log σ(l_d) + (1 − x_d) log(1 − σ(l_d)), 1 − σ(l) = σ(−l)."""
    l64, x64 = logits.double(), x.double()
    return (x64 * F.logsigmoid(l64) + (1 - x64) * F.logsigmoid(-l64)).sum(-1)


def test_plain_formula_matches_the_definition():
    logits = torch.tensor([[-3.0, 0.0, 2.5, 10.0]], dtype=torch.float64)
    x = torch.tensor([[1.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(L.plain(x, logits), reference(x, logits))
    # by hand: log σ(-3) + log(1/2) + log σ(2.5) + log(1 − σ(10))
    s = torch.sigmoid
    hand = torch.log(s(torch.tensor(-3.0, dtype=torch.float64))) + torch.log(torch.tensor(0.5, dtype=torch.float64)) \
        + torch.log(s(torch.tensor(2.5, dtype=torch.float64))) + torch.log1p(-s(torch.tensor(10.0, dtype=torch.float64)))
    torch.testing.assert_close(L.plain(x, logits)[0], hand)


@pytest.mark.parametrize("shape_l,shape_x", [((2, 3, 5, 784), (5, 784)),          # one model, M x K samples
                                             ((4, 6, 5, 784), (4, 1, 5, 784)),    # a stack of 4
                                             ((3, 7, 30), (7, 30)),               # D = 30: 15 factors of 2 lanes
                                             ((2, 4, 13), (4, 13)),               # D prime: 13 factors, 1 lane
                                             ((2, 3, 1600), (3, 1600))])          # 50 factors of 32 lanes
def test_compiled_value_and_gradient_equal_the_plain_formula(compiler, shape_l, shape_x):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(*shape_l, generator=gen) * 6
    logits.view(-1)[:4] = torch.tensor([0.0, 60.0, -60.0, 19.9])  # saturated and threshold values too
    logits.requires_grad_()
    x = (torch.rand(*shape_x, generator=gen) < 0.3).float()
    with L.mode("compiled"):
        value = L.bernoulli_log_lik(x, logits)
    cot = torch.randn(value.shape, generator=gen)
    (g_fast,) = torch.autograd.grad(value, logits, cot)
    l64 = logits.detach().double().requires_grad_()
    ref = reference(x, l64)
    (g_ref,) = torch.autograd.grad(ref, l64, cot.double())
    d = shape_l[-1]
    # fp32: each row sums D terms of up to ~60: rounding well under 1e-5 of the sum of |terms|
    assert value.shape == ref.shape == logits.shape[:-1]
    assert ((value.double() - ref).abs() <= 1e-6 * (l64.detach().abs().sum(-1) + d)).all()
    torch.testing.assert_close(g_fast.double(), g_ref, rtol=1e-5, atol=1e-6)
    # and as close to the definition as the plain formula in fp32 is
    plain_err = (L.plain(x, logits.detach()).double() - ref).abs().max()
    assert (value.double() - ref).abs().max() <= 3 * plain_err + 1e-4


def _burda(latents, hidden, seed=0):
    torch.manual_seed(seed)
    mean = torch.rand(784) * 0.9 + 0.05
    return VAE(latents, hidden, train_mean=mean)


@pytest.mark.parametrize("latents,hidden", [([50], [200]), ([100, 50], [200, 100])])
@pytest.mark.parametrize("estimator", ["reparam", "dreg"])
def test_burda_gradients_equal_the_plain_formula(compiler, latents, hidden, estimator):
    """burda1/burda2 iwae: θ and φ gradients (DReG: two backward passes through the fused op)."""
    model = _burda(latents, hidden)
    x = (torch.rand(20, 784, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    obj, est = make_objective("iwae"), get_estimator(estimator)
    out = {}
    for mode in ("plain", "compiled"):
        with L.mode(mode):
            lws = model.log_weights(x, 1, 30, need_bar=est.needs_lw_bar, generator=torch.Generator().manual_seed(2))
            losses = surrogate_losses(obj, est, lws.lw, lws.lw_bar)
            g_theta, g_phi = gradients(losses, model.theta_parameters(), model.phi_parameters())
        out[mode] = (lws.lw.detach(), g_theta, g_phi)
    torch.testing.assert_close(out["compiled"][0], out["plain"][0], rtol=1e-6, atol=2e-4)
    for g_fast, g_plain in zip(out["compiled"][1] + out["compiled"][2], out["plain"][1] + out["plain"][2]):
        err = torch.linalg.vector_norm(g_fast - g_plain)
        assert err <= 1e-4 * torch.linalg.vector_norm(g_plain) + 1e-6


def test_stacked_log_weights_and_gradients_equal_the_plain_formula(compiler):
    models = [_burda([50], [200], seed=s) for s in range(3)]
    stack = StackedVAE(models)
    x = (torch.rand(3, 20, 784, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    eps = stack.draw_eps([torch.Generator().manual_seed(s) for s in range(3)], 20, 20)
    out = {}
    for mode in ("plain", "compiled"):
        with L.mode(mode):
            lw = stack.log_weights(x, eps).lw
            grads = torch.autograd.grad(lw.sum(), list(stack.parameters()))
        out[mode] = (lw.detach(), grads)
    torch.testing.assert_close(out["compiled"][0], out["plain"][0], rtol=1e-6, atol=2e-4)
    for a, b in zip(out["compiled"][1], out["plain"][1]):
        assert torch.linalg.vector_norm(a - b) <= 1e-4 * torch.linalg.vector_norm(b) + 1e-6


def test_evaluation_equals_the_plain_formula(compiler):
    model = _burda([50], [200]).eval()
    x = (torch.rand(3, 784, generator=torch.Generator().manual_seed(3)) < 0.3).float()
    res = {}
    for mode in ("plain", "compiled"):
        with L.mode(mode):
            res[mode] = ev.log_likelihoods(model, x, 600, [1, 64], ev.DEFAULT_ROWS, 0, pass_rows=512)
    for key in res["plain"]:
        # bounds: fp32 sums of 784 terms of log p ~ -700, a few ulp (6e-5 each); ESS and the largest
        # weight are exponentials of log-weight differences, so such a δ moves them by a factor e^(2δ)
        rtol = 1e-3 if key in ("ess", "max_weight") else 1e-6
        torch.testing.assert_close(res["compiled"][key], res["plain"][key], rtol=rtol, atol=1e-4)


def test_small_calls_and_plain_mode_are_the_plain_formula_exactly():
    """mode auto below COMPILE_MIN_ELEMENTS (and mode plain) computes exactly the plain formula."""
    logits = torch.randn(2, 5, 784, requires_grad=True)
    x = (torch.rand(5, 784) < 0.3).float()
    assert logits.numel() < L.COMPILE_MIN_ELEMENTS
    for mode in ("auto", "plain"):
        with L.mode(mode):
            assert torch.equal(L.bernoulli_log_lik(x, logits), L.plain(x, logits))


def test_under_torch_func_transforms_it_is_the_plain_formula():
    logits = torch.randn(4, 2, 300, 784)
    x = (torch.rand(300, 784) < 0.3).float()
    with L.mode("compiled"):
        per = vmap(lambda l: L.bernoulli_log_lik(x, l))(logits)
        g = grad(lambda l: L.bernoulli_log_lik(x, l).sum())(logits[0])
    torch.testing.assert_close(per, L.plain(x, logits))
    torch.testing.assert_close(g, x - torch.sigmoid(logits[0]))


def test_a_failing_or_wrong_kernel_falls_back_to_the_plain_formula(monkeypatch):
    logits = torch.randn(1, 400, 20, 784, requires_grad=True)
    x = (torch.rand(20, 784) < 0.3).float()

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    def wrong(l, x):
        return L._forward_math(l, x) + 1.0

    for kernels, match in (((broken, broken), "no C\\+\\+ compiler"), ((wrong, L._backward_math), "differs")):
        monkeypatch.setitem(L._compiled, "cpu", kernels)
        monkeypatch.setattr(L, "_checked", {})
        with L.mode("compiled"), pytest.warns(RuntimeWarning, match=match):
            value = L.bernoulli_log_lik(x, logits)
        torch.testing.assert_close(value, L.plain(x, logits))
        assert L._compiled["cpu"] is False  # and the plain formula from then on
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with L.mode("compiled"):
                assert torch.equal(L.bernoulli_log_lik(x, logits), L.plain(x, logits))


def test_no_compile_setting_uses_the_plain_formula(monkeypatch):
    monkeypatch.setenv("VAEXP_COMPILE", "0")
    logits = torch.randn(1, 400, 20, 784)
    x = (torch.rand(20, 784) < 0.3).float()
    with L.mode("compiled"):
        assert torch.equal(L.bernoulli_log_lik(x, logits), L.plain(x, logits))
    assert L._kernels(torch.device("cpu")) is None


def test_shapes_it_does_not_fuse_get_the_plain_formula():
    logits = torch.randn(2, 3, 100, 784)
    x_full = (torch.rand(2, 3, 100, 784) < 0.3).float()   # x not shared by the samples
    x = (torch.rand(100, 784) < 0.3).float()
    with L.mode("compiled"):
        assert L._blocks(x_full, logits) is None
        assert torch.equal(L.bernoulli_log_lik(x_full, logits), L.plain(x_full, logits))
        assert L._blocks(x, logits.transpose(1, 2).contiguous().transpose(1, 2)) is None  # not contiguous
        assert L._blocks(x, logits) == (1, 6, 100, 784)
        assert L._blocks(x_full[:, :1], logits) == (2, 3, 100, 784)  # a stack: x [N, 1, B, D]


def test_products_run_down_whole_vectors_and_stay_inside_fp32():
    """Each product has at most MAX_FACTORS factors in (1, 2] (so < 2^64), down a multiple of 16 lanes
    where one divides D."""
    assert L._factors(784) == 49          # 16 lanes (one AVX-512 vector) of 49 factors
    assert L._factors(48) == 3
    assert L._factors(1600) == 50         # 16 lanes would be 100 factors: 32 lanes
    assert L._factors(30) == 15 and L._factors(13) == 13 and L._factors(1) == 1  # no multiple of 16 divides D
    for d in range(1, 3000):
        a = L._factors(d)
        assert d % a == 0 and a <= L.MAX_FACTORS, d
    # the largest product there can be: D pixels at logit 0, every factor exactly 2
    logits, x = torch.zeros(1, 1600), torch.zeros(1, 1600)
    torch.testing.assert_close(L._forward_math(logits, x), torch.tensor([-1600 * math.log(2.0)]))


def test_inside_a_compiled_graph_it_is_the_fused_math_and_differentiates(compiler):
    """In a torch.compile trace (the evaluation's compiled pass, the compiled training step) it is
    the kernels' math, the lane products, with and without a gradient; values and gradient equal
    the definition's."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 40, 784, generator=gen) * 6
    x = (torch.rand(40, 784, generator=gen) < 0.3).float()

    def fn(x, l):
        return L.bernoulli_log_lik(x, l) * 1.0

    for live in (False, True):
        with torch.set_grad_enabled(live):
            graphs = torch._dynamo.explain(fn)(x, logits.clone().requires_grad_(live)).graphs
        code = "".join(g.print_readable(print_output=False) for g in graphs)
        assert "prod" in code and "softplus" not in code, live
    f = torch.compile(fn, fullgraph=True, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(f(x, logits), L._forward_math(logits.view(1, 3, 40, 784), x.view(1, 1, 40, 784))
                                   .view(3, 40), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(f(x, logits).double(), reference(x, logits), rtol=1e-6, atol=2e-4)
    logits.requires_grad_()
    (g,) = torch.autograd.grad(f(x, logits).sum(), logits)
    torch.testing.assert_close(g, x - torch.sigmoid(logits.detach()), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ on a GPU

def _kernel_ran(device: str, backward: bool) -> bool:
    """The compiled kernels (forward, and backward if asked) ran and passed their first-call check
    there, and none has failed since (a failure switches the device to the plain formula)."""
    kernels = (0, 1) if backward else (0,)
    return bool(L._compiled.get(device)) and all(L._checked.get(f"{device}:{k}") for k in kernels)


@needs_cuda
@pytest.mark.parametrize("shape_l,shape_x", [((2, 3, 5, 784), (5, 784)), ((1, 2500, 1, 784), (1, 784))])
def test_cuda_compiled_value_and_gradient_equal_the_plain_formula(shape_l, shape_x):
    """On CUDA the kernels are the compiler's GPU code (Triton): the same checks as on a CPU."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(*shape_l, generator=gen) * 6).cuda()
    logits.view(-1)[:4] = torch.tensor([0.0, 60.0, -60.0, 19.9], device="cuda")
    logits.requires_grad_()
    x = (torch.rand(*shape_x, generator=gen) < 0.3).float().cuda()
    with L.mode("compiled"):
        value = L.bernoulli_log_lik(x, logits)
    cot = torch.randn(value.shape, generator=gen).cuda()
    (g_fast,) = torch.autograd.grad(value, logits, cot)
    assert _kernel_ran("cuda", backward=True)  # not the plain formula after a failed kernel
    l64 = logits.detach().double().requires_grad_()
    ref = reference(x, l64)
    (g_ref,) = torch.autograd.grad(ref, l64, cot.double())
    assert ((value.double() - ref).abs() <= 1e-6 * (l64.detach().abs().sum(-1) + shape_l[-1])).all()
    torch.testing.assert_close(g_fast.double(), g_ref, rtol=1e-5, atol=1e-6)


@needs_cuda
@pytest.mark.parametrize("estimator", ["reparam", "dreg"])
def test_cuda_burda_gradients_equal_the_plain_formula(estimator):
    model = _burda([50], [200]).cuda()
    x = (torch.rand(20, 784, generator=torch.Generator().manual_seed(1)) < 0.3).float().cuda()
    obj, est = make_objective("iwae"), get_estimator(estimator)
    out = {}
    for mode in ("plain", "compiled"):
        with L.mode(mode):
            gen = torch.Generator(device="cuda").manual_seed(2)
            lws = model.log_weights(x, 1, 30, need_bar=est.needs_lw_bar, generator=gen)
            losses = surrogate_losses(obj, est, lws.lw, lws.lw_bar)
            g_theta, g_phi = gradients(losses, model.theta_parameters(), model.phi_parameters())
        out[mode] = (lws.lw.detach(), g_theta, g_phi)
    assert _kernel_ran("cuda", backward=True)
    torch.testing.assert_close(out["compiled"][0], out["plain"][0], rtol=1e-6, atol=2e-4)
    for g_fast, g_plain in zip(out["compiled"][1] + out["compiled"][2], out["plain"][1] + out["plain"][2]):
        assert torch.linalg.vector_norm(g_fast - g_plain) <= 1e-4 * torch.linalg.vector_norm(g_plain) + 1e-6


@needs_cuda
def test_cuda_evaluation_equals_the_plain_formula():
    model = _burda([50], [200]).cuda().eval()
    x = (torch.rand(3, 784, generator=torch.Generator().manual_seed(3)) < 0.3).float().cuda()
    res = {}
    for mode in ("plain", "compiled"):
        with L.mode(mode):
            res[mode] = ev.log_likelihoods(model, x, 600, [1, 64], ev.DEFAULT_ROWS, 0,
                                           pass_rows=ev.pass_rows_for(model, torch.device("cuda"), 600))
    assert _kernel_ran("cuda", backward=False)
    for key in res["plain"]:
        rtol = 1e-3 if key in ("ess", "max_weight") else 1e-6
        torch.testing.assert_close(res["compiled"][key], res["plain"][key], rtol=rtol, atol=1e-4)
