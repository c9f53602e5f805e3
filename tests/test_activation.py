"""tanh in compiled CPU graphs (vaexp.models.activation): the formula against float64's tanh over
fp32's whole range, its special values, that compiled graphs use it and eager code does not, and
its gradient, compiled, against torch.tanh's."""
from __future__ import annotations

import math

import pytest
import torch

from vaexp.models import activation, dense
from vaexp.models import likelihood as L

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _grid() -> torch.Tensor:
    """Dense around the branch point and up to 12 (tanh = 1 in fp32 from ~9), log-spaced down to
    fp32's smallest normal numbers, both signs (subnormals read as 0 once vaexp flushes them)."""
    lin = torch.linspace(0, 12, 1_200_001)
    near = activation.SMALL + torch.linspace(-1e-3, 1e-3, 20_001)
    tiny = torch.logspace(-37, 0, 20_000)
    pos = torch.cat([lin, near, tiny]).float()
    return torch.cat([pos, -pos])


def _max_rel(y: torch.Tensor, x: torch.Tensor) -> float:
    ref = torch.tanh(x.double())
    keep = ref != 0
    return float(((y.double() - ref).abs()[keep] / ref.abs()[keep]).max())


def test_formula_is_within_a_few_ulp_of_tanh():
    x = _grid()
    y = activation.tanh_formula(x)
    # 1.36e-7 measured: ~2 ulp (torch.tanh: 6.3e-8); the polynomial alone used above SMALL, or the
    # exponential form below it (where 1 − 2/(e^2x + 1) cancels), would be far off
    assert _max_rel(y, x) < 2e-7
    assert _max_rel(torch.tanh(x), x) < 1e-7  # the reference's own tolerance, for scale
    assert torch.equal(activation.tanh_formula(-x), -y)  # odd, bit for bit


def test_formula_special_values():
    x = torch.tensor([0.0, -0.0, 50.0, -50.0, 1e4, math.inf, -math.inf, math.nan])
    y = activation.tanh_formula(x)
    assert torch.equal(y[:2], x[:2]) and torch.equal(torch.signbit(y[:2]), torch.tensor([False, True]))
    assert y[2:7].tolist() == [1.0, -1.0, 1.0, 1.0, -1.0]
    assert math.isnan(y[7])
    # the select keeps the polynomial's value below SMALL: for tiny x, exactly x
    t = torch.tensor([1e-30, 3e-8, -1e-12])
    assert torch.equal(activation.tanh_formula(t), t)


def test_eager_is_torch_tanh():
    x = torch.randn(100, 7) * 3
    assert torch.equal(activation.tanh(x), torch.tanh(x))
    assert dense.PLAIN["tanh"] is activation.tanh


def test_compiled_graphs_use_the_formula():
    """What Dynamo traces (a Python backend: no C++ compiler needed): the formula's exp, no tanh."""
    graphs = []

    def keep(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(lambda x: activation.tanh(x) * 2, backend=keep, fullgraph=True)
    x = torch.randn(8, 5)
    torch.testing.assert_close(fn(x), torch.tanh(x) * 2, rtol=2e-7, atol=0)
    code = "\n".join(gm.print_readable(print_output=False) for gm in graphs)
    assert "exp" in code and "torch.tanh" not in code


@pytest.fixture(scope="module")
def compiler():
    if L._kernels(torch.device("cpu")) is None:
        pytest.skip("torch.compile does not work on this machine")


def test_compiled_value_and_gradient_equal_torch_tanh(compiler):
    """Inductor's kernels: the value within the formula's few ulp, ∂x = g·(1 − y²) (tanh's own backward)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(300, 200, generator=gen) * 3, _grid()[:60_000].view(300, 200)]).requires_grad_()
    g = torch.randn(x.shape, generator=gen)
    fn = torch.compile(activation.tanh, fullgraph=True)
    y = fn(x)
    (dx,) = torch.autograd.grad(y, x, g)
    assert _max_rel(y.detach(), x.detach()) < 2e-7
    y_ref = torch.tanh(x)
    (dx_ref,) = torch.autograd.grad(y_ref, x, g)
    torch.testing.assert_close(dx, g * (1 - y.detach() ** 2), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)
