"""tanh for the hidden layers: torch.tanh, except inside a torch.compile graph on a CPU.

There the compiler's vectorised tanh (Sleef's tanhf, 1 ulp) costs ~4x its exp: on a 2-core
AVX-512 Xeon VM 157-173 µs for a [1000, 200] layer, two of them 0.35 ms of a 7.3 ms burda1 k = 50
step. :func:`tanh` computes it there as Cephes' tanhf does, an odd polynomial below |x| = 0.625
and 1 − 2/(e^2|x| + 1) above, in 85 µs, within 1.4e-7 relative of the true tanh (torch.tanh:
6.3e-8; tests/test_activation.py); its backward is tanh's own, g·(1 − y²), from y alone.
Invariants: odd, tanh(±0) = ±0, ±1 at ±inf, NaN at NaN; which formula runs depends on the device,
the dtype and eager or compiled only, never on history, so a resumed run computes what it would have
(a compiled run differs from an eager one in the last bits, as with the compiled likelihood).
"""
from __future__ import annotations

import torch
from torch import Tensor

# Cephes' tanhf: below this |x| the polynomial, above it the exponential form.
SMALL = 0.625
# x + x³·P(x²) on |x| < SMALL (Cephes' tanhf coefficients, highest power first).
POLY = (-5.70498872745e-3, 2.06390887954e-2, -5.37397155531e-2, 1.33314422036e-1, -3.33332819422e-1)


def tanh_formula(x: Tensor) -> Tensor:
    """tanh(x) as Cephes' tanhf computes it, on |x| with x's sign put back (so odd, and
    tanh(-0) = -0); both branches, then the select: vector code."""
    a = x.abs()
    z = a * a
    p = torch.full_like(a, POLY[0])
    for c in POLY[1:]:
        p = p * z + c
    # e^2|x| overflows to inf from |x| ~ 44: 2 / inf = 0 and the result is exactly 1
    t = torch.where(a < SMALL, a + a * z * p, 1 - 2 / (torch.exp(2 * a) + 1))
    return torch.copysign(t, x)


class _Tanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = tanh_formula(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(g, y)


def compiled_form(device: torch.device, compiling: bool) -> str:
    """The tanh compiled graphs on `device` compute ("cephes" or "torch"), where vaexp may
    compile (`compiling`): a run records it with its kernels (vaexp.training.run.kernels)."""
    return "cephes" if compiling and device.type == "cpu" else "torch"


def tanh(x: Tensor) -> Tensor:
    if x.device.type == "cpu" and x.dtype == torch.float32 and torch.compiler.is_compiling():
        return _Tanh.apply(x)
    return torch.tanh(x)
