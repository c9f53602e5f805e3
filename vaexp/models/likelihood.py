"""The Bernoulli log-likelihood Σ_d x_d·l_d − softplus(l_d) of the decoder's logits, in few passes.

Written as the plain formula it is four elementwise passes over the [rows, D] logits forward
(x·l, softplus, the difference, the sum) and five backward, each with a [rows, D] temporary; in the
K = 5000 evaluation they cost more than the matmuls. :func:`bernoulli_log_lik` instead runs one
compiled pass forward (no [rows, D] tensor besides the logits; softplus summed as a log of
products, one log per ~50 pixels) and one backward, which writes ∂/∂l = g·(x − σ(l)): the only
[rows, D] tensor the Linear layer's backward needs. The logits' GEMM stays the layer's own, so
autograd still computes only the products a backward pass asks for. Inside a torch.compile trace
the same math is handed to that compiler to fuse into the graph around it. Where torch.compile
does not work (no compiler), for calls too small to pay the compiled call's overhead and under
torch.func transforms, it is the plain formula (eager PyTorch has no fused softplus-and-sum).
Invariants: value and gradient equal the plain formula's up to float rounding
(tests/test_likelihood.py); which kernel runs depends on the mode, the device, eager or compiled
and the call's size only, never on history, so a resumed run computes bit for bit what it would
have (and a machine without a compiler differs in the last bits).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor

from vaexp import runtime
from vaexp.models.base import bernoulli_log_prob

# auto: the compiled kernels for calls of at least COMPILE_MIN_ELEMENTS logits when a compiler
# works (below that the compiled call's overhead outweighs what it saves: measured break-even
# ~100 x 784 on a CPU), else the plain formula; compiled: whenever it works; plain: never.
MODES = ("auto", "compiled", "plain")
COMPILE_MIN_ELEMENTS = 1 << 18
# Σ softplus(l) = Σ relu(l) + Σ_lanes log Π_lane (1 + e^-|l|): one log per product (49 pixels for
# D = 784) instead of one log1p per pixel. The products run down LANES contiguous lanes (16 fp32:
# one AVX-512 vector, two AVX2 ones), so the compiled loop is whole vectors (~30% faster than 28
# lanes of 28 on the Zen 5 VM). Each factor is in (1, 2], so a product of at most MAX_FACTORS stays
# far inside fp32's range (2^64 of 2^128); its rounding (≤ 64 ulp) is that of a sum of the D terms.
LANES = 16
MAX_FACTORS = 64
GROUP = 28  # where no multiple of LANES fits: products of the largest divisor of D up to GROUP

_mode = "auto"
_compiled: Dict[str, object] = {}   # device type -> (forward, backward) compiled, or False: failed


def set_mode(mode: str) -> None:
    global _mode
    if mode not in MODES:
        raise ValueError(f"likelihood mode {mode!r}: one of {', '.join(MODES)}")
    _mode = mode


def get_mode() -> str:
    return _mode


@contextlib.contextmanager
def mode(name: str) -> Iterator[None]:
    """Use kernel mode `name` inside the block (the benchmark's columns, the tests)."""
    old = _mode
    set_mode(name)
    try:
        yield
    finally:
        set_mode(old)


# The textbook formula, stable for large |logits|: the reference every fast path must match.
plain = bernoulli_log_prob


# -- the kernels: l [G, S, B, D] logits, x [G, 1, B, D] data (shared by the S samples) ---------------

def _factors(d: int) -> int:
    """Factors per product: d / (the smallest multiple of LANES dividing d with at most
    MAX_FACTORS factors), else the largest divisor of d up to GROUP."""
    for inner in range(LANES, d + 1, LANES):
        if d % inner == 0 and d // inner <= MAX_FACTORS:
            return d // inner
    return max(g for g in range(1, min(GROUP, d) + 1) if d % g == 0)


def _forward_math(l: Tensor, x: Tensor) -> Tensor:
    """Σ_d x·l − softplus(l), softplus(l) = relu(l) + log1p(e^-|l|), the log1p summed per lane as one
    log of a product: the compiled forward (one fused kernel; no [rows, D] buffer). Both reductions
    run over the same [factors, lanes] view, so the compiler reads the logits once (two loops, one
    for each, measured 7% slower)."""
    d = l.shape[-1]
    a = _factors(d)
    lv = l.view(*l.shape[:-1], a, d // a)
    xv = x.reshape(*x.shape[:-1], a, d // a)
    s = (xv * lv - lv.clamp_min(0)).sum(-2)
    t = (1 + torch.exp(-lv.abs())).prod(-2)
    return (s - torch.log(t)).sum(-1)


def _backward_math(l: Tensor, x: Tensor, g: Tensor) -> Tensor:
    return g.unsqueeze(-1) * (x - torch.sigmoid(l))


def _kernels(device: torch.device):
    """(forward, backward) compiled for this device type, or None where compiling failed or is off."""
    kind = device.type
    if not runtime.compiling():
        return None
    if kind not in _compiled:
        try:
            _compiled[kind] = (runtime.compile(_forward_math, dynamic=True, fullgraph=True),
                               runtime.compile(_backward_math, dynamic=True, fullgraph=True))
        except Exception as err:  # noqa: BLE001 - no compiler: the plain formula
            _disable(kind, err)
    return _compiled[kind] or None


def _disable(kind: str, err: BaseException) -> None:
    _compiled[kind] = False
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    warnings.warn(f"vaexp: the compiled likelihood kernels do not work on {kind} ({type(err).__name__}: "
                  f"{first[:200]}); using the plain formula (same values up to float rounding)",
                  RuntimeWarning, stacklevel=4)


_checked: Dict[str, bool] = {}


def _run_compiled(which: int, eager, args: Tuple[Tensor, ...]) -> Optional[Tensor]:
    """The compiled kernel's result, or None (then the caller computes it eagerly). The first call
    per device type and kernel is checked against the eager computation on the same inputs."""
    kernels = _kernels(args[0].device)
    if kernels is None:
        return None
    kind = args[0].device.type
    try:
        # detached: requires_grad is part of a compiled graph's guards, and the kernels differentiate nothing
        args = tuple(a.detach() for a in args)
        out = kernels[which](*args)
        key = f"{kind}:{which}"
        if not _checked.get(key):
            ref = eager(*args)
            # Forward: per-row sums of D terms, rounding ~1e-7 relative to the sum of |terms|.
            tol = (1e-5 * (args[0].abs().sum(-1) + args[0].shape[-1]) if which == 0
                   else 1e-5 * (1 + ref.abs()))
            if out.shape != ref.shape or not bool(((out - ref).abs() <= tol).all()):
                raise RuntimeError("the compiled kernel's result differs from the eager computation's")
            _checked[key] = True
        return out
    except Exception as err:  # noqa: BLE001 - any failure: the plain formula from now on
        _disable(kind, err)
        return None


def _use_compiled(l: Tensor) -> bool:
    return _mode == "compiled" or (_mode == "auto" and l.numel() >= COMPILE_MIN_ELEMENTS)


def _plain4(l: Tensor, x: Tensor) -> Tensor:
    return plain(x, l)


def _forward(l: Tensor, x: Tensor) -> Tensor:
    out = _run_compiled(0, _plain4, (l, x))
    return plain(x, l) if out is None else out


def _backward(l: Tensor, x: Tensor, g: Tensor) -> Tensor:
    out = _run_compiled(1, _backward_math, (l, x, g))
    return _backward_math(l, x, g) if out is None else out


class _BernoulliLogLik(torch.autograd.Function):
    """Forward: the compiled kernel (plain where it fails); backward: ∂/∂l in one pass. Inside a
    torch.compile trace the kernels' math itself, for that compiler to fuse into the graph around
    it (the compiled kernels would be a graph in a graph)."""

    @staticmethod
    def forward(ctx, l: Tensor, x: Tensor) -> Tensor:
        ctx.save_for_backward(l, x)
        return _forward_math(l, x) if torch.compiler.is_compiling() else _forward(l, x)

    @staticmethod
    def backward(ctx, g: Tensor):
        l, x = ctx.saved_tensors
        g = g.contiguous()
        return (_backward_math(l, x, g) if torch.compiler.is_compiling() else _backward(l, x, g)), None


def _blocks(x: Tensor, logits: Tensor) -> Optional[Tuple[int, int, int, int]]:
    """(G, S, B, D) when logits [..., B, D] is S samples of each of G blocks of x [G?, 1?, B, D]
    (x shared by the samples), else None."""
    if (logits.dim() < 2 or not 2 <= x.dim() <= logits.dim() or not logits.is_contiguous()
            or x.dtype != logits.dtype or logits.numel() == 0):
        return None
    b, d = logits.shape[-2:]
    lead = x.shape[:-2]
    if tuple(x.shape[-2:]) != (b, d):
        return None
    if all(s == 1 for s in lead):
        g = 1                     # one x for every sample
    elif x.dim() == logits.dim() and x.shape[0] == logits.shape[0] and all(s == 1 for s in lead[1:]):
        g = x.shape[0]            # a stack: x [N, 1, B, D] against logits [N, S, B, D]
    else:
        return None
    return g, logits.numel() // (g * b * d), b, d


def bernoulli_log_lik(x: Tensor, logits: Tensor) -> Tensor:
    """log Bernoulli(x; σ(logits)) summed over the last axis, = plain(x, logits) up to rounding.

    logits [..., B, D]; x [B, D] (one model) or [N, 1, B, D] against logits [N, S, B, D] (a stack):
    x is shared by the samples. Other shapes, x that needs a gradient, torch.func transforms,
    dispatch modes and small calls (mode auto) get the plain formula; inside a torch.compile trace
    it is :func:`_in_graph`."""
    if torch.compiler.is_compiling():
        return _in_graph(x, logits)
    shape = _blocks(x, logits) if _use_compiled(logits) else None
    if (shape is None or x.requires_grad or torch._C._are_functorch_transforms_active()
            or torch._C._len_torch_dispatch_stack() > 0):
        return plain(x, logits)  # (a TorchDispatchMode, e.g. a FLOP counter, would stop compilation)
    if _kernels(logits.device) is None:  # no working compiler
        return plain(x, logits)
    l4, x4 = logits.view(shape), x.reshape(shape[0], 1, shape[2], shape[3])
    if torch.is_grad_enabled() and logits.requires_grad:
        out = _BernoulliLogLik.apply(l4, x4)
    else:
        out = _forward(l4, x4)
    return out.reshape(logits.shape[:-1])


def _in_graph(x: Tensor, logits: Tensor) -> Tensor:
    """bernoulli_log_lik inside a torch.compile trace (the compiled training step, the evaluation's
    compiled pass): the compiled kernels' math, one log per lane forward and g·(x − σ(l)) backward,
    for the compiler to fuse (burda1 k = 50 on the Zen 5 VM: the step's elementwise kernels 0.63 ms
    instead of the plain formula's 0.81); the plain formula where those kernels would not run (mode
    plain, other shapes, x that needs a gradient)."""
    shape = _blocks(x, logits) if _mode != "plain" else None
    if shape is None or x.requires_grad:
        return plain(x, logits)
    l4, x4 = logits.view(shape), x.reshape(shape[0], 1, shape[2], shape[3])
    out = _BernoulliLogLik.apply(l4, x4) if torch.is_grad_enabled() and logits.requires_grad else _forward_math(l4, x4)
    return out.reshape(logits.shape[:-1])
