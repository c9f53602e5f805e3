"""Dense layers, y = act(x Wᵀ + b), on the machine's fastest float32 GEMM kernel.

PyTorch's CPU build runs float32 matmuls through MKL, and MKL takes its AVX2 code path on
non-Intel CPUs: on the Zen 5 VM measured here (AVX-512) MKL reached ~110 GFLOP/s per core on
Burda's layer shapes and oneDNN (in every PyTorch CPU build too) ~230. With backend auto on a
non-Intel x86 CPU with AVX-512 (on an AVX2-only one both libraries run AVX2 code:
:func:`vendor_wants_onednn`), and on Intel's with AVX-512 for layers with nothing to differentiate
(the evaluation), :func:`linear` therefore runs a layer's forward and ∂x GEMMs through
oneDNN for layers of at least MIN_MACS multiply-adds (smaller ones are launch-bound) and MIN_ROWS
rows, the others on MKL, with tanh/relu fused into the forward GEMM's epilogue (their backward
needs only y), and ∂W on MKL (in compiled graphs on oneDNN for widening and square layers on many
rows). Its backward computes only the gradients the running backward pass asks for (as torch's
own addmm does; a custom Function is only told which inputs require grad), which matters for
DReG/STL's two passes.
Inside torch.compile the same kernel runs as the op vaexp::onednn_linear. Elsewhere (CUDA, other
dtypes, torch.func transforms, dispatch modes, backend aten, small layers) it is F.linear plus the
activation. Invariants: values and gradients equal the plain formula's up to float rounding
(tests/test_dense.py); which kernel runs depends on the backend, the device, the CPU (vendor and AVX-512),
eager or compiled, and the shapes only, never on history or the thread count (both kernels give the same
bits at 1 and 2 threads on the shapes routed to them, MKL in the strict mode `import vaexp` asks for:
vaexp.runtime.ask_strict_gemm, tests/test_runtime.py), so a resumed run computes what it would have.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from vaexp.models import activation
from vaexp.runtime import GEMM_BACKENDS as BACKENDS, GEMM_ENV as BACKEND_ENV

# A layer goes through oneDNN from this many multiply-adds (rows x in x out) per GEMM. Eager with
# gradients, below ~16M (burda1's layers at k = 5) the custom Function's Python cost per call
# outweighs the faster kernel; without that cost (a compiled graph, or nothing to differentiate),
# below ~2M (a 200->200 layer on 20 rows, 50->200 on 100) oneDNN's own per-call cost does
# (measured on the Zen 5 VM, 2 threads).
MIN_MACS = 1 << 24
MIN_MACS_LEAN = 1 << 21
# ... and from this many rows. On fewer rows some oneDNN builds split the inner (in) dimension
# between threads, so the sums depend on the thread count: torch 2.11's oneDNN does for ≤ 50 rows
# of 784 -> 200/400 (the encoder's first layer on a batch of 20), 2.13's does not. On MKL that layer
# takes ~10 µs longer alone, and the k = 5 step is no slower measurably; with this rule the thread
# count changes no result with torch 2.4, 2.11 or 2.13 (tests/test_runtime.py).
MIN_ROWS = 64
# ∂W by oneDNN (compiled graphs, widening and square layers) from this many rows: fewer, and
# oneDNN is slower.
MIN_WEIGHT_GRAD_ROWS = 512
# Activations oneDNN fuses into the GEMM (its eltwise post-ops), with their backward from y alone.
FUSED = {"tanh": torch.ops.aten.tanh_backward, "relu": lambda g, y: torch.ops.aten.threshold_backward(g, y, 0)}
# tanh: torch.tanh, or in compiled CPU graphs a faster formula of the same accuracy class (vaexp.models.activation)
PLAIN = {"tanh": activation.tanh, "relu": torch.relu, "softplus": F.softplus, None: None}

# (the CLI refuses another value of $VAEXP_GEMM with one line: vaexp.runtime.env_problem)
_backend = os.environ.get(BACKEND_ENV) if os.environ.get(BACKEND_ENV) in BACKENDS else "auto"
_cpu_vendor: Optional[str] = None


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={name!r}: one of {', '.join(BACKENDS)}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Use GEMM backend `name` inside the block (the benchmark's columns, the tests)."""
    old = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


def _cpuinfo_field(name: str, cpuinfo: str) -> str:
    """The first `name : value` of /proc/cpuinfo, "" where it cannot be read."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "\t", ":"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def read_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's vendor_id (GenuineIntel, AuthenticAMD, ...), "" where it cannot be read."""
    return _cpuinfo_field("vendor_id", cpuinfo)


def read_avx512(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU has AVX-512 (the avx512f flag; False where it cannot be read)."""
    return "avx512f" in _cpuinfo_field("flags", cpuinfo).split()


def vendor_wants_onednn(vendor: str, avx512: bool, differentiable: bool = True) -> bool:
    """backend auto's rule: oneDNN where MKL would leave AVX-512 unused (a non-Intel CPU with it).
    Measured on an AVX2-only AMD EPYC (Zen 1, 2 threads, interleaved rounds), MKL against oneDNN:
    compiled burda1 steps at k = 5 9% faster, k = 50 2%, DReG 5%; the K = 5000 evaluation 2% slower
    (within the VM's noise); so an unknown vendor, Intel and AVX2-only CPUs keep MKL for training.
    Layers with nothing to differentiate (the evaluation) go to oneDNN on Intel's AVX-512 CPUs
    too: on a 2-core AVX-512 Xeon VM the K = 5000 evaluation ran at 85 against 72.5 images/s (oneDNN
    fuses the bias and tanh into the GEMM; MKL's addmm first copies the bias into the output and
    tanh is a pass of its own), while compiled training steps on oneDNN were 5-12% slower there."""
    if not avx512 or vendor == "":
        return False
    return vendor != "GenuineIntel" or not differentiable


def cpu_vendor() -> str:
    global _cpu_vendor
    if _cpu_vendor is None:
        _cpu_vendor = read_vendor()
    return _cpu_vendor


def onednn_works() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def uses_onednn(device: torch.device, differentiable: bool = True) -> bool:
    """Whether big float32 GEMMs on `device` go through oneDNN under the current backend (layers
    with or without gradients to compute)."""
    if device.type != "cpu" or _backend == "aten" or not _works:
        return False
    if _backend == "onednn":
        return True
    # auto: oneDNN on non-Intel CPUs with AVX-512, and on Intel's without gradients; MKL's own
    # kernels elsewhere (vendor_wants_onednn).
    return _vendor_wants_onednn if differentiable else _vendor_wants_onednn_eval


# Read once, at import (torch.compile then sees constants).
_works = onednn_works()
_avx512 = read_avx512()
_vendor_wants_onednn = vendor_wants_onednn(cpu_vendor(), _avx512)
_vendor_wants_onednn_eval = vendor_wants_onednn(cpu_vendor(), _avx512, differentiable=False)


def kernel_name(device: torch.device) -> str:
    """What runs a big training layer's GEMMs on `device` (a run records it with its results; the
    evaluation's kernels are a fixed rule of the CPU and the backend too: :func:`uses_onednn`)."""
    return "onednn+mkl" if uses_onednn(device) else "aten"


def _dnn(a: Tensor, b_t: Tensor, bias: Optional[Tensor] = None, act: str = "none") -> Tensor:
    """act(a @ b_tᵀ + bias) by oneDNN (a, b_t may be transposed views)."""
    return torch.ops.mkldnn._linear_pointwise(a, b_t, bias, act, [], "")


def _by_onednn(rows: int, n_in: int, n_out: int, lean: bool) -> bool:
    """Whether a layer of these shapes runs its forward and ∂x GEMMs by oneDNN: a fixed rule of
    the shapes (and of `lean`: no Python Function around the call), so the same run always runs
    the same kernels."""
    return _backend == "onednn" or (rows >= MIN_ROWS and rows * n_in * n_out >= (MIN_MACS_LEAN if lean else MIN_MACS))


def _node(t: Tensor):
    """The autograd node a gradient for t flows into (its grad_fn, or a leaf's accumulator)."""
    if not t.requires_grad:
        return None
    if t.grad_fn is not None:
        return t.grad_fn
    return t.view_as(t).grad_fn.next_functions[0][0]  # the leaf's AccumulateGrad (as torch.autograd.graph finds it)


_will_run = getattr(torch._C, "_will_engine_execute_node", None)


def _wanted(node) -> bool:
    """Whether the running backward pass needs a gradient into `node` (True when unknown)."""
    if node is None:
        return False
    if _will_run is None:
        return True
    try:
        return bool(_will_run(node))
    except RuntimeError:
        return True


def _grads(g: Tensor, x2: Tensor, w: Tensor, y: Optional[Tensor], act: Optional[str], need, dnn,
           traced: bool = False):
    """(∂x, ∂W, ∂b) of act(x2 Wᵀ + b) for the upstream gradient g; None where `need` says no."""
    if act is not None:
        g = FUSED[act](g, y)
    g = g.contiguous()
    dx = dnn(g, w.t(), None, "none") if need[0] else None
    dw = None
    if need[1]:
        # ∂W = gᵀx. oneDNN's linear reads gᵀ only as a contiguous copy: eager, that transposing
        # copy costs more than MKL's whole product (which reads the transposed operands in place);
        # in a compiled graph the compiler writes gᵀ from the kernel that makes g, and oneDNN wins
        # for a widening or square layer on many rows (at k = 50: the 200->784 logits layer 0.70 ms
        # vs 1.57, a 200->200 layer 0.24 vs 0.41; a narrowing one measured no faster)
        if traced and w.shape[0] >= w.shape[1] and x2.shape[0] >= MIN_WEIGHT_GRAD_ROWS:
            dw = dnn(g.t().contiguous(), x2.t(), None, "none")
        else:
            dw = g.t() @ x2
    db = g.sum(0) if need[2] else None
    return dx, dw, db


class _Linear(torch.autograd.Function):
    """Eager: x2 [rows, in] -> act(x2 Wᵀ + b) [rows, out], forward and ∂x by oneDNN, ∂W by MKL;
    the backward skips the gradients the running backward pass does not need."""

    @staticmethod
    def forward(ctx, x2: Tensor, w: Tensor, b: Optional[Tensor], act: Optional[str], nodes) -> Tensor:
        y = _dnn(x2, w, b, act or "none")
        ctx.act, ctx.nodes = act, nodes
        ctx.save_for_backward(x2, w, y if act is not None else None)
        return y

    @staticmethod
    @once_differentiable  # oneDNN's ops have no derivatives: a double backward fails loudly
    def backward(ctx, g: Tensor):
        x2, w, y = ctx.saved_tensors
        need = (ctx.needs_input_grad[0] and _wanted(ctx.nodes[0]),
                ctx.needs_input_grad[1] and _wanted(ctx.nodes[1]), ctx.needs_input_grad[2])
        return _grads(g, x2, w, y, ctx.act, need, _dnn) + (None, None)


# -- inside torch.compile: the kernel as an op the compiler calls as it is (its own lowering of
# mkldnn's op expects prepacked weights); a plain torch.library op costs ~2 µs a call, a
# torch.library.custom_op ~7 µs ------------------------------------------------------------------

def _onednn_fake(a: Tensor, b_t: Tensor, bias: Optional[Tensor], act: str) -> Tensor:
    return a.new_empty(a.shape[0], b_t.shape[0])


if not hasattr(torch.ops.vaexp, "onednn_linear"):  # once per process (a module reload keeps it)
    _lib = torch.library.Library("vaexp", "DEF")
    _lib.define("onednn_linear(Tensor a, Tensor b_t, Tensor? bias, str act) -> Tensor")
    _lib.impl("onednn_linear", _dnn, "CPU")
    torch.library.register_fake("vaexp::onednn_linear", _onednn_fake, lib=_lib)


_op = torch.ops.vaexp.onednn_linear


class _TracedLinear(torch.autograd.Function):
    """_Linear inside a torch.compile trace: every gradient its inputs require (the compiler drops
    those the graph's backward does not use)."""

    @staticmethod
    def forward(ctx, x2: Tensor, w: Tensor, b: Optional[Tensor], act: Optional[str]) -> Tensor:
        y = _op(x2, w, b, act or "none")
        ctx.act = act
        ctx.save_for_backward(x2, w, y)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        x2, w, y = ctx.saved_tensors
        return _grads(g, x2, w, y, ctx.act, ctx.needs_input_grad, _op, traced=True) + (None,)


def _plain(x: Tensor, w: Tensor, b: Optional[Tensor], act: Optional[str]) -> Tensor:
    y = F.linear(x, w, b)
    return y if act is None else PLAIN[act](y)


def linear(x: Tensor, w: Tensor, b: Optional[Tensor] = None, act: Optional[str] = None) -> Tensor:
    """act(x Wᵀ + b) for x [..., in], W [out, in]; act one of PLAIN's keys (None: none)."""
    traced = torch.compiler.is_compiling()
    differentiable = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                                  or (b is not None and b.requires_grad))
    if (act not in PLAIN or (act is not None and act not in FUSED) or x.dtype != torch.float32
            or w.dtype != torch.float32 or x.dim() < 2 or not uses_onednn(x.device, differentiable)
            or (not traced and (torch._C._are_functorch_transforms_active()
                                or torch._C._len_torch_dispatch_stack() > 0))):
        return _plain(x, w, b, act)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows == 0 or not _by_onednn(rows, x.shape[-1], w.shape[0], traced or not differentiable):
        return _plain(x, w, b, act)
    x2 = x.reshape(rows, x.shape[-1])
    if not traced and not differentiable:
        y = _dnn(x2, w, b, act or "none")  # nothing to differentiate (the evaluation)
    elif traced:
        # (views: Dynamo reads requires_grad=False off the parameters torch.func.grad has just
        # wrapped, inside the one-graph training step, and would then trace the Function's forward
        # as plain ops with no derivative, the op's gradients silently zero; a view's is read right)
        y = _TracedLinear.apply(x2.view_as(x2), w.view_as(w), None if b is None else b.view_as(b), act)
    else:
        y = _Linear.apply(x2, w, b, act, (_node(x2), _node(w)))
    return y.view(*x.shape[:-1], w.shape[0])


class Linear(nn.Linear):
    """nn.Linear (same parameters, init and state-dict keys) computed by :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class MLP(nn.Sequential):
    """Linear, activation, Linear, activation, ... (nn.Sequential's layout and state-dict keys),
    each pair one :func:`linear` call with the activation fused where oneDNN can fuse it."""

    def forward(self, h: Tensor) -> Tensor:
        mods = list(self)
        for lin, act in zip(mods[0::2], mods[1::2]):
            name = _ACT_NAMES.get(type(act))
            if isinstance(lin, nn.Linear) and name is not None:
                h = linear(h, lin.weight, lin.bias, name)
            else:  # e.g. a stacked copy's StackedLinear (vaexp.models.stacked)
                h = PLAIN[name](lin(h)) if name is not None else act(lin(h))
        return h


_ACT_NAMES = {nn.Tanh: "tanh", nn.ReLU: "relu", nn.Softplus: "softplus"}
