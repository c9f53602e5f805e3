"""Common-subexpression elimination for compiled graphs that differentiate inside themselves.

torch.compile merges repeated computations only in graphs that autograd differentiates (its
partitioner runs CSE on the joint graph). A graph that takes its own gradient (torch.func.grad, as
vaexp.training.step.CompiledLoneStep does) is an inference graph to the compiler, and there two
computations of the same value stay two: the two-surrogate estimators evaluate log p(x, z) once with
z stopped and once with θ stopped (the same values) and burda1 k = 50 DReG ran its decoder's three
forward GEMMs twice. :data:`PASS`, Inductor's post-grad pass, merges them.

Invariant: a node is merged only into an earlier node with the same operator and the same
arguments (a gradient-stopping view counting as its input), in the same stretch between two mutations, where the operator is a pure ATen one (no
in-place or out= form, no random draw), and never when it is itself a graph output (outputs stay
separate tensors, as in eager code). So the graph computes exactly what it did, once.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Dict, Hashable

import torch

try:
    from torch._inductor.custom_graph_pass import CustomGraphPass
except ImportError:  # an older torch without custom post-grad passes: the graph keeps its repeats
    CustomGraphPass = None


def _pure(target: Any) -> bool:
    if not isinstance(target, torch._ops.OpOverload):
        return False
    return not target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in target.tags


# Views that only stop gradients: a computation on one is the same as on its input (Inductor's
# post-grad graph has none left; a make_fx graph of torch.func.grad keeps them).
_SAME_VALUE = (torch.ops.aten.detach.default, torch.ops.aten.alias.default)


def _key(value: Any, same: Dict[torch.fx.Node, torch.fx.Node]) -> Hashable:
    """Arguments as a hashable key: nodes by the node whose value they are, floats by repr (0.0
    and -0.0 differ)."""
    if isinstance(value, torch.fx.Node):
        return ("node", same.get(value, value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__,) + tuple(_key(v, same) for v in value)
    if isinstance(value, dict):
        return ("dict",) + tuple((k, _key(v, same)) for k, v in sorted(value.items()))
    if isinstance(value, float):
        return ("float", repr(value))
    hash(value)  # TypeError: not mergeable
    return (type(value).__name__, value)


def eliminate(graph: torch.fx.Graph) -> int:
    """Merge the repeated computations of `graph` in place; returns how many nodes it removed."""
    outputs = set()
    for node in graph.nodes:
        if node.op == "output":
            outputs.update(node.all_input_nodes)
    region, removed = 0, 0
    seen: Dict[Hashable, torch.fx.Node] = {}
    same: Dict[torch.fx.Node, torch.fx.Node] = {}
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _SAME_VALUE and isinstance(node.args[0], torch.fx.Node):
            same[node] = same.get(node.args[0], node.args[0])
            continue
        if isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable:
            region += 1  # reads after a mutation may see other values
            continue
        if not _pure(node.target):
            continue
        try:
            key = (node.target, _key(node.args, same), _key(node.kwargs, same), region)
        except TypeError:
            continue
        first = seen.get(key)
        if first is None:
            seen[key] = node
            continue
        if node in outputs:
            continue
        node.replace_all_uses_with(first)
        graph.erase_node(node)
        removed += 1
    return removed


PASS = None
if CustomGraphPass is not None:
    class _Pass(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            eliminate(graph)

        def uuid(self) -> str:  # Inductor's graph cache keys on it: this file's text
            return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()

    PASS = _Pass()
