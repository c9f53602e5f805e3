"""vaexp.training.cse: repeated computations merged, nothing else changed."""
from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from vaexp.training import cse

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _count(graph: torch.fx.Graph, op) -> int:
    return sum(1 for n in graph.nodes if n.op == "call_function" and n.target is op)


def _graph(fn, *args) -> torch.fx.GraphModule:
    return make_fx(fn)(*args)


def _check(fn, *args):
    """fn's graph after elimination computes what fn does; returns (graph module, nodes removed)."""
    gm = _graph(fn, *args)
    removed = cse.eliminate(gm.graph)
    gm.recompile()
    got, want = gm(*args), fn(*args)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    return gm, removed


def test_a_repeated_product_is_computed_once():
    a, b = torch.randn(5, 4), torch.randn(4, 3)
    gm, removed = _check(lambda a, b: (a @ b).sum() + torch.tanh(a @ b).sum(), a, b)
    assert removed == 1 and _count(gm.graph, torch.ops.aten.mm.default) == 1


def test_the_two_surrogates_pattern_differentiates_the_shared_forward_once():
    """The compiled step's two-surrogate loss: log p once with z stopped (θ's gradient), once with
    θ stopped (z's): torch.func.grad traces the forward twice; after elimination once, with both
    gradients as before."""
    w, z = torch.randn(4, 6), torch.randn(8, 4)

    def loss(w, z):
        theta_part = torch.tanh(z.detach() @ w).pow(2).sum()
        phi_part = torch.tanh(z @ w.detach()).sum()
        return theta_part + phi_part

    grads = torch.func.grad(loss, argnums=(0, 1))
    before = _count(_graph(grads, w, z).graph, torch.ops.aten.mm.default)
    gm, removed = _check(grads, w, z)
    after = _count(gm.graph, torch.ops.aten.mm.default)
    assert removed > 0 and after == before - 1  # the forward product, once


def test_random_draws_mutations_and_outputs_stay_apart():
    x = torch.randn(6)
    # two draws are two values
    gm = _graph(lambda x: torch.randn_like(x) + torch.randn_like(x), x)
    cse.eliminate(gm.graph)
    assert _count(gm.graph, torch.ops.aten.randn_like.default) == 2

    # a value read before and after an in-place change is two values
    def mutating(x):
        y = x * 2
        x.add_(1)
        return y + x * 2

    gm = _graph(mutating, x.clone())
    assert cse.eliminate(gm.graph) == 0
    gm.recompile()
    a, b = x.clone(), x.clone()
    torch.testing.assert_close(gm(a), mutating(b), rtol=0, atol=0)

    # outputs stay separate tensors; 0.0 and -0.0 are different constants
    gm = _graph(lambda x: (x * 2, x * 2), x)
    cse.eliminate(gm.graph)
    first, second = gm(x)
    assert first is not second and _count(gm.graph, torch.ops.aten.mul.Tensor) == 2
    gm = _graph(lambda x: (x * 0.0).sum() + (x * -0.0).sum(), x)
    assert cse.eliminate(gm.graph) == 0


def test_the_pass_identifies_itself_for_inductors_cache():
    if cse.PASS is None:
        pytest.skip("this torch has no custom post-grad passes")
    assert cse.PASS.uuid() == cse.PASS.uuid() and len(cse.PASS.uuid()) == 64
