"""The dense layers' oneDNN path (vaexp.models.dense) against the plain formula: values and
gradients of every activation and shape, gradients a backward pass does not ask for are not
computed (DReG's two passes), the compiled form, the same bits at 1 and 2 threads, a whole
training step and the evaluation, and the backend rule (which CPUs, devices and sizes)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vaexp import evaluate as ev
from vaexp.estimators import get_estimator, gradients, surrogate_losses
from vaexp.models import dense
from vaexp.models.burda import VAE
from vaexp.models.stacked import StackedVAE
from vaexp.objectives import make_objective

pytestmark = pytest.mark.usefixtures("one_torch_thread")

needs_onednn = pytest.mark.skipif(not dense.onednn_works(), reason="this torch build has no oneDNN")


def plain(x, w, b, act):
    y = F.linear(x, w, b)
    return {None: y, "tanh": torch.tanh(y), "relu": torch.relu(y), "softplus": F.softplus(y)}[act]


def _inputs(shape, n_in, n_out, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, n_in, generator=gen, dtype=dtype).requires_grad_()
    w = (torch.randn(n_out, n_in, generator=gen, dtype=dtype) / n_in ** 0.5).requires_grad_()
    b = torch.randn(n_out, generator=gen, dtype=dtype).requires_grad_()
    return x, w, b, gen


@needs_onednn
@pytest.mark.parametrize("act", [None, "tanh", "relu", "softplus"])
@pytest.mark.parametrize("shape,n_in,n_out", [((37,), 13, 7), ((3, 5, 4), 50, 200), ((2, 60), 200, 784)])
def test_value_and_gradients_equal_the_plain_formula(act, shape, n_in, n_out):
    x, w, b, gen = _inputs(shape, n_in, n_out)
    with dense.backend("onednn"):
        y = dense.linear(x, w, b, act)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = plain(x64, w64, b64, act)
    assert y.shape == ref.shape and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    cot = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(y, (x, w, b), cot.float())
    want = torch.autograd.grad(ref, (x64, w64, b64), cot)
    for g, r in zip(got, want):
        assert g.shape == r.shape
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4 * (1 + r.abs().max().item()))


@needs_onednn
def test_hand_made_values():
    # x = [1, 2], W = [[1, 0], [0.5, -1]], b = [0, 1]: x Wᵀ = [1, -1.5], x Wᵀ + b = [1, -0.5]
    x = torch.tensor([[1.0, 2.0]])
    w = torch.tensor([[1.0, 0.0], [0.5, -1.0]])
    b = torch.tensor([0.0, 1.0])
    with dense.backend("onednn"):
        torch.testing.assert_close(dense.linear(x, w, b), torch.tensor([[1.0, -0.5]]))
        torch.testing.assert_close(dense.linear(x, w, b, "relu"), torch.tensor([[1.0, 0.0]]))
        torch.testing.assert_close(dense.linear(x, w, None, "tanh"), torch.tanh(torch.tensor([[1.0, -1.5]])))


@needs_onednn
def test_a_backward_pass_computes_only_the_gradients_it_needs(monkeypatch):
    """Two layers, h = tanh(lin1(x)), y = lin2(h): asking for lin2's weight alone runs no ∂x GEMM;
    asking for lin1's weight runs lin2's ∂x (to reach h) but not lin1's (x is data)."""
    x, w1, b1, gen = _inputs((40,), 30, 20)
    x = x.detach()
    w2 = torch.randn(10, 20, generator=gen).requires_grad_()
    calls = []
    real = dense._dnn

    def counting(a, b_t, bias=None, act="none"):
        calls.append(tuple(a.shape))
        return real(a, b_t, bias, act)

    monkeypatch.setattr(dense, "_dnn", counting)
    with dense.backend("onednn"):
        y = dense.linear(dense.linear(x, w1, b1, "tanh"), w2)
        loss = (y ** 2).sum()
        calls.clear()
        (g2,) = torch.autograd.grad(loss, [w2], retain_graph=True)
        assert calls == []                        # no ∂x at all (∂W is MKL's)
        (g1,) = torch.autograd.grad(loss, [w1])
        assert calls == [(40, 10)]                # lin2's ∂x only
    h = torch.tanh(F.linear(x, w1, b1))
    ref = (F.linear(h, w2) ** 2).sum()
    r2, r1 = torch.autograd.grad(ref, [w2, w1])
    torch.testing.assert_close(g2, r2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g1, r1, rtol=1e-4, atol=1e-4)


@needs_onednn
@pytest.mark.parametrize("estimator", ["reparam", "dreg", "stl"])
def test_a_training_steps_gradients_equal_atens(estimator):
    """burda2 (both activations' layers, two stochastic layers) on 8 x 16 sample rows: the θ and φ
    gradients of each surrogate, oneDNN vs ATen (DReG and STL: two backward passes)."""
    torch.manual_seed(0)
    model = VAE([6, 4], [32, 16])
    x = (torch.rand(8, 784) < 0.3).float()
    obj, est = make_objective("iwae"), get_estimator(estimator)
    grads = {}
    for name in ("onednn", "aten"):
        with dense.backend(name):
            lws = model.log_weights(x, 2, 8, need_bar=est.needs_lw_bar, generator=torch.Generator().manual_seed(3))
            losses = surrogate_losses(obj, est, lws.lw, lws.lw_bar)
            grads[name] = gradients(losses, model.theta_parameters(), model.phi_parameters())
    for got, want in zip(grads["onednn"][0] + grads["onednn"][1], grads["aten"][0] + grads["aten"][1]):
        # norm-wise: entries near 0 of sums over 128 sample rows differ by fp32 rounding (~1e-5)
        assert got.shape == want.shape
        assert torch.linalg.vector_norm(got - want) <= 1e-4 * torch.linalg.vector_norm(want)


@needs_onednn
def test_the_evaluation_equals_atens():
    torch.manual_seed(1)
    model = VAE([4], [32]).eval()
    x = (torch.rand(3, 784) < 0.3).float()
    out = {}
    for name in ("onednn", "aten"):
        with dense.backend(name), ev.no_tf32():
            out[name] = ev.log_likelihoods(model, x, 50, [1], 4096, 0)
    torch.testing.assert_close(out["onednn"]["log_px"], out["aten"]["log_px"], rtol=1e-6, atol=1e-4)


@needs_onednn
def test_the_same_bits_at_one_and_two_threads():
    x, w, b, gen = _inputs((700,), 200, 784)
    cot = torch.randn(700, 784, generator=gen)
    old = torch.get_num_threads()
    got = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with dense.backend("onednn"):
                y = dense.linear(x, w, b, "tanh")
                got.append((y,) + torch.autograd.grad(y, (x, w, b), cot))
    finally:
        torch.set_num_threads(old)
    for a, c in zip(*got):
        assert torch.equal(a, c)


@needs_onednn
@pytest.mark.parametrize("rows,n_in,n_out", [(64, 50, 200), (600, 50, 200), (600, 30, 30), (600, 200, 50)])
def test_inside_torch_compile_the_same_numbers(rows, n_in, n_out):
    """(600 rows: ∂W by oneDNN for the widening and the square layer, MKL for the narrowing one.)"""
    x, w, b, gen = _inputs((rows,), n_in, n_out)

    def f(x, w, b):
        return (dense.linear(x, w, b, "tanh") ** 2).sum()

    torch._dynamo.reset()
    with dense.backend("onednn"):
        try:
            compiled = torch.compile(f, fullgraph=True)
            value = compiled(x, w, b)
        except Exception as err:  # noqa: BLE001 - no working compiler here: nothing to test
            pytest.skip(f"torch.compile does not work here ({type(err).__name__})")
        got = torch.autograd.grad(value, (x, w, b))
    torch._dynamo.reset()
    ref = f(x, w, b)
    want = torch.autograd.grad(ref, (x, w, b))
    torch.testing.assert_close(value, ref, rtol=1e-5, atol=1e-3)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@needs_onednn
@pytest.mark.parametrize("act", [None, "tanh", "relu"])
def test_torch_func_grad_inside_a_compiled_graph_differentiates_the_layer(act):
    """As the one-graph training step does (vaexp.training.step.CompiledLoneStep): torch.func.grad
    of a loss of the parameters, called inside torch.compile. Dynamo once read the freshly wrapped
    parameters as not requiring grad and traced the layer's forward with no derivative: gradients
    silently zero (the step's first-call check caught it). The same gradients as the plain formula."""
    x, w, b, gen = _inputs((600,), 200, 784)
    x = x.detach()
    cot = torch.randn(600, 784, generator=gen)
    params = {"w": w.detach(), "b": b.detach()}

    def loss(p, x, layer):
        return (layer(x, p["w"], p["b"], act) * cot).sum()

    def grads(p, x):
        return torch.func.grad(loss)(p, x, dense.linear)

    want = torch.func.grad(loss)(params, x, plain)
    torch._dynamo.reset()
    with dense.backend("onednn"):
        try:
            got = torch.compile(grads, fullgraph=True)(params, x)
        except Exception as err:  # noqa: BLE001 - no working compiler here: nothing to test
            pytest.skip(f"torch.compile does not work here ({type(err).__name__})")
        finally:
            torch._dynamo.reset()
    for key, r in want.items():
        assert float(r.abs().max()) > 1
        torch.testing.assert_close(got[key], r, rtol=1e-4, atol=1e-4 * float(r.abs().max()))


@needs_onednn
def test_a_second_derivative_fails_loudly():
    x, w, b, _ = _inputs((8,), 5, 3)
    with dense.backend("onednn"):
        y = dense.linear(x, w, b, "tanh").sum()
        (gx,) = torch.autograd.grad(y, x, create_graph=True)
        with pytest.raises(RuntimeError):
            torch.autograd.grad(gx.sum(), w)


def test_the_backend_rule(monkeypatch):
    cpu = torch.device("cpu")
    with dense.backend("aten"):
        assert not dense.uses_onednn(cpu) and dense.kernel_name(cpu) == "aten"
    monkeypatch.setattr(dense, "_works", True)
    assert not dense.uses_onednn(torch.device("cuda"))
    with dense.backend("auto"):
        monkeypatch.setattr(dense, "_vendor_wants_onednn", False)  # an Intel CPU: MKL's own kernels
        monkeypatch.setattr(dense, "_vendor_wants_onednn_eval", True)  # ... with AVX-512: oneDNN without gradients
        assert not dense.uses_onednn(cpu) and dense.uses_onednn(cpu, differentiable=False)
        assert dense.kernel_name(cpu) == "aten"  # the training's kernels
        called = []
        monkeypatch.setattr(dense, "_dnn", lambda *a: called.append(a[3]) or dense.F.linear(*a[:3]).tanh())
        x, w, b, _ = _inputs((300,), 784, 200)
        with torch.no_grad():
            dense.linear(x, w, b, "tanh")
        assert called == ["tanh"]  # the evaluation's layer: one oneDNN call with the activation fused
        dense.linear(x, w, b, "tanh")
        assert called == ["tanh"]  # with gradients: MKL
        monkeypatch.undo()
        monkeypatch.setattr(dense, "_works", True)
        monkeypatch.setattr(dense, "_vendor_wants_onednn", True)   # e.g. AMD with AVX-512: MKL's AVX2 path
        assert dense.uses_onednn(cpu) and dense.kernel_name(cpu) == "onednn+mkl"
        # small layers stay on MKL: burda1's at k = 5 with gradients, a 200->200 layer on 20 rows without
        assert not dense._by_onednn(100, 200, 784, lean=False) and dense._by_onednn(1000, 200, 784, lean=False)
        assert not dense._by_onednn(20, 200, 200, lean=True) and dense._by_onednn(100, 200, 784, lean=True)
        # few rows stay on MKL however big the layer (some oneDNN builds split the sums between threads there)
        assert not dense._by_onednn(dense.MIN_ROWS - 1, 784, 4096, lean=True)
        assert dense._by_onednn(dense.MIN_ROWS, 784, 400, lean=True)
    monkeypatch.setattr(dense, "_works", False)
    with dense.backend("onednn"):
        assert not dense.uses_onednn(cpu)  # no oneDNN in this build: ATen's
    with pytest.raises(ValueError, match="VAEXP_GEMM"):
        dense.set_backend("mkl")


def test_the_vendor_is_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\n")
    assert dense.read_vendor(str(info)) == "AuthenticAMD"
    info.write_text("processor\t: 0\n")                       # no vendor line (e.g. aarch64)
    assert dense.read_vendor(str(info)) == ""
    assert dense.read_vendor(str(tmp_path / "missing")) == ""  # not Linux: unknown, so MKL's kernels


def test_onednn_only_where_mkl_would_leave_avx512_unused(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse avx2 avx512f avx512bw\n")
    assert dense.read_avx512(str(info))
    info.write_text("vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse avx2 fma\n")  # Zen 1-3
    assert not dense.read_avx512(str(info))
    info.write_text("vendor_id\t: AuthenticAMD\nflagsx\t: avx512f\n")           # another field's name
    assert not dense.read_avx512(str(info))
    assert not dense.read_avx512(str(tmp_path / "missing"))
    assert dense.vendor_wants_onednn("AuthenticAMD", True)        # e.g. Zen 4/5: MKL's AVX2 path
    assert not dense.vendor_wants_onednn("AuthenticAMD", False)   # AVX2-only: both run AVX2 code
    assert not dense.vendor_wants_onednn("GenuineIntel", True)    # MKL's own AVX-512 kernels for training,
    assert dense.vendor_wants_onednn("GenuineIntel", True, differentiable=False)  # oneDNN's fusion for eval
    assert not dense.vendor_wants_onednn("GenuineIntel", False, differentiable=False)
    assert not dense.vendor_wants_onednn("", True) and not dense.vendor_wants_onednn("", True, False)  # unknown


def test_the_plain_formula_where_onednn_does_not_apply():
    """float64, torch.func transforms and backend aten give F.linear's own result, bit for bit."""
    x, w, b, _ = _inputs((30,), 20, 10, dtype=torch.float64)
    with dense.backend("onednn"):
        assert torch.equal(dense.linear(x, w, b, "tanh"), torch.tanh(F.linear(x, w, b)))
    x, w, b, _ = _inputs((30,), 20, 10)
    with dense.backend("aten"):
        assert torch.equal(dense.linear(x, w, b, "relu"), torch.relu(F.linear(x, w, b)))
    with dense.backend("onednn"):
        per_row = torch.func.vmap(lambda r: dense.linear(r, w, b))(x.detach())
    assert torch.equal(per_row, torch.func.vmap(lambda r: F.linear(r, w, b))(x.detach()))


def test_the_models_keep_their_parameter_names():
    """Checkpoints of earlier versions (nn.Sequential / nn.Linear) load: the same names and shapes."""
    model = VAE([4], [8])
    names = [n for n, _ in model.named_parameters()]
    assert names[:4] == ["encoder.0.net.0.weight", "encoder.0.net.0.bias", "encoder.0.net.2.weight",
                         "encoder.0.net.2.bias"]
    assert "decoder.0.logits.weight" in names
    stack = StackedVAE([VAE([4], [8]), VAE([4], [8])])
    assert [n for n, _ in stack.named_parameters()] == names
