"""The fast training steps: on CUDA the whole step replayed as one CUDA graph, on a CPU the step's
forward and loss as one torch.compile'd graph (fast=auto), each kept only after a first-step check.

Inside the graph: the ε draws (the run's own generators, registered with the graph), forward,
both surrogates, both gradients, capturable Adam (lr a device tensor: :func:`set_lr` fills it
in place). Outside: the epoch's binarisation and permutation and the batch gather into the
static input. Invariants: the first call checks one replay against an eager reference step
(parameters, Adam state and generators restored in place around it) and keeps the graph only if
they match, else fast=auto warns and continues eagerly (fast=true raises); checkpoints are in
the eager optimizer's format (:func:`portable_state_dict`), so runs move between fast settings
and devices. On CPU it is tested through a stand-in backend (tests/test_capture.py); its CUDA
tests skip without a GPU. The compiled CPU step (vaexp.training.step.CompiledLoneStep) runs behind
the same check (:class:`CheckedStep`), and only for runs long enough to repay its compilation.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import Tensor

from vaexp import runtime
from vaexp.errors import VaexpError, is_out_of_memory

# The graph's first replay must reproduce the eager step this closely (parameters after one
# Adam step move by ~lr = 1e-3, so 1e-6 is 0.1% of a step; outputs are bounds and norms).
PARAM_ATOL, PARAM_RTOL = 1e-6, 1e-5
OUT_ATOL, OUT_RTOL = 1e-4, 1e-4
WARMUP_STEPS = 3
# A compiled step fuses differently, so it rounds differently: its first gradients must match the
# eager step's to 1e-4 norm-wise per parameter (fp32 rounding over 1000-row sums is ~1e-6).
GRAD_RTOL = 1e-4
# A CPU run compiles its step (a few seconds, once per process) only when it computes at least this
# many sample rows (steps x M x K x batch): ~10% of the eager time of 1e7 burda1 rows is ~15 s.
COMPILE_MIN_ROWS = 10_000_000


# What fast=auto does, in the words every message that suggests it uses.
AUTO = "fast=auto (on CUDA the captured CUDA graph; on a CPU the compiled step of long runs, else the eager one)"


class CaptureError(VaexpError):
    pass


def mode(value) -> str:
    """'auto' | 'true' | 'false' from a config value (the CLI may hand over True/False/'True')."""
    return str(getattr(value, "value", value)).strip().lower()


def wanted(value, device: torch.device) -> bool:
    """Whether the captured step should be tried for this setting on this device."""
    m = mode(value)
    if m == "false":
        return False
    if device.type != "cuda":
        if m == "true":
            raise CaptureError(f"fast=true: the captured training step needs a CUDA device, this run uses "
                                f"{device}; use {AUTO} or fast=false")
        return False
    return True


# -- the optimizer's learning rate and its checkpoint format ----------------------------------------

def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate: in place when it is a device tensor (a captured graph
    reads that tensor's memory), by assignment otherwise."""
    for group in opt.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def make_capturable(opt: torch.optim.Optimizer, device: torch.device) -> None:
    """Turn an Adam (fresh or just loaded from a checkpoint) into its capturable form: lr a
    device tensor, state step counts on the device."""
    for group in opt.param_groups:
        group["capturable"] = True
        if group.get("fused"):  # the captured step uses the capturable foreach kernels
            group["fused"] = None
        if not torch.is_tensor(group["lr"]):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        for p in group["params"]:
            state = opt.state.get(p)
            if state and "step" in state:
                state["step"] = state["step"].to(device=p.device)


def portable_state_dict(opt: torch.optim.Optimizer) -> Dict:
    """opt.state_dict() as an eager Adam writes it (lr a float, capturable off, steps on the
    CPU); unchanged when the optimizer already is eager."""
    sd = opt.state_dict()
    if not any(g.get("capturable") or torch.is_tensor(g.get("lr")) for g in sd["param_groups"]):
        return sd
    groups = []
    for g in sd["param_groups"]:
        g = dict(g)
        if torch.is_tensor(g["lr"]):
            g["lr"] = float(g["lr"])
        g["capturable"] = False
        groups.append(g)
    state = {key: {name: (v.detach().to("cpu") if name == "step" and torch.is_tensor(v) else v)
                   for name, v in s.items()} for key, s in sd["state"].items()}
    return {"state": state, "param_groups": groups}


# -- snapshots: what a step changes, put back in place ------------------------------------------------

class Snapshot:
    """Parameters, the optimizer's per-parameter state and generator states, restored *in place*
    (copy_ into the same tensors), so tensors a captured graph points at stay valid. A parameter
    without optimizer state at snapshot time gets zeros and step 0 back, which is exactly a
    fresh Adam state."""

    def __init__(self, params: Sequence[Tensor], opt: torch.optim.Optimizer,
                 generators: Sequence[torch.Generator]):
        self.params, self.opt, self.generators = list(params), opt, list(generators)
        self.values = [p.detach().clone() for p in self.params]
        self.state = [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
                      if p in opt.state else None for p in self.params]
        self.rng = [g.get_state() for g in self.generators]

    def restore(self) -> None:
        with torch.no_grad():
            for p, v, saved in zip(self.params, self.values, self.state):
                p.copy_(v)
                for key, now in self.opt.state.get(p, {}).items():
                    if not torch.is_tensor(now):
                        continue
                    if saved is not None and key in saved:
                        now.copy_(saved[key])
                    else:
                        now.zero_()
                p.grad = None
        for g, s in zip(self.generators, self.rng):
            g.set_state(s)


def _close(a: Sequence[Tensor], b: Sequence[Tensor], atol: float, rtol: float) -> bool:
    return all(torch.allclose(x, y, atol=atol, rtol=rtol, equal_nan=True) for x, y in zip(a, b))


def _grads_close(params: Sequence[Tensor], reference: Sequence[Tensor]) -> bool:
    """Each parameter's gradient within GRAD_RTOL of the reference's, norm-wise. (Not the updated
    parameters: Adam's first step moves every weight by ~lr·sign(g), so a gradient entry next to 0
    that rounds differently moves its weight by 2·lr; a rounding-level difference is fine.)"""
    for p, ref in zip(params, reference):
        if p.grad is None or p.grad.shape != ref.shape:
            return False
        err, scale = torch.linalg.vector_norm(p.grad - ref), torch.linalg.vector_norm(ref)
        if not bool(err <= GRAD_RTOL * scale + 1e-12):
            return False
    return True


# -- the captured step ---------------------------------------------------------------------------------

class CUDAGraphBackend:
    """The CUDA pieces, kept apart so tests can put a CPU stand-in in their place."""

    def new_graph(self, generators: Sequence[torch.Generator]):
        graph = torch.cuda.CUDAGraph()
        for g in generators:  # non-default generators must be registered before capture
            graph.register_generator_state(g)
        return graph

    def warm_up(self, fn: Callable[[], Tensor], steps: int) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(steps):
                fn()
        torch.cuda.current_stream().wait_stream(stream)

    def capture(self, graph, fn: Callable[[], Tensor]) -> Tensor:
        with torch.cuda.graph(graph):
            out = fn()
        return out

    def replay(self, graph) -> None:
        graph.replay()


class CapturedStep:
    """`step(x) -> Tensor` (the eager training step: it reads x, updates parameters and optimizer
    state in place, and returns a small tensor of metrics) run as a replayed CUDA graph.

    The first call captures (see the module docstring) and performs that call's step; later
    calls copy x into the static input and replay. The returned tensor is the graph's static
    output: read it (or add it to an accumulator) before the next call.
    """

    def __init__(self, step: Callable[[Tensor], Tensor], params: Sequence[Tensor], opt: torch.optim.Optimizer,
                 generators: Sequence[torch.Generator], strict: bool = False, backend=None,
                 warmup: int = WARMUP_STEPS):
        self.step, self.params, self.opt = step, list(params), opt
        self.generators, self.strict, self.warmup = list(generators), strict, warmup
        self.backend = backend or CUDAGraphBackend()
        self.graph = None
        self.x: Optional[Tensor] = None
        self.out: Optional[Tensor] = None
        self.eager = False  # True once capture failed or did not match: eager from then on
        self.reason: Optional[str] = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, x: Tensor) -> Tensor:
        if self.graph is not None:
            self.x.copy_(x)
            self.backend.replay(self.graph)
            return self.out
        if self.eager:
            return self.step(x)
        return self._capture_and_step(x)

    def _capture_and_step(self, x: Tensor) -> Tensor:
        snap = Snapshot(self.params, self.opt, self.generators)
        eager_ran = False
        try:
            reference = self.step(x).detach().clone()
            eager_ran = True
            after = [p.detach().clone() for p in self.params]
            snap.restore()
            self.x = x.detach().clone()
            self.backend.warm_up(lambda: self.step(self.x), self.warmup)
            snap.restore()
            graph = self.backend.new_graph(self.generators)
            out = self.backend.capture(graph, lambda: self.step(self.x))
            snap.restore()  # capture records work without running it; put back anything eager
            self.backend.replay(graph)
            if not (_close([out], [reference], OUT_ATOL, OUT_RTOL)
                    and _close(self.params, after, PARAM_ATOL, PARAM_RTOL)):
                raise CaptureError("the captured step's first result differs from the eager step's")
        except Exception as err:  # noqa: BLE001 - any failure means: use the eager step
            snap.restore()
            self.graph, self.out, self.x = None, None, None
            if not eager_ran and is_out_of_memory(err):
                raise  # the eager step itself does not fit: nothing to fall back to
            return self._fall_back(x, err)
        self.graph, self.out = graph, out
        return out

    def _fall_back(self, x: Tensor, err: BaseException) -> Tensor:
        self.eager = True
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        self.reason = f"{type(err).__name__}: {first}"
        if self.strict:
            raise CaptureError(f"fast=true: the training step could not be captured as a CUDA graph "
                                f"({self.reason}); use fast=auto to fall back to the eager step") from err
        warnings.warn(f"vaexp: the training step could not be captured as a CUDA graph ({self.reason}); "
                      f"continuing with the eager step (set fast=false to skip the attempt)",
                      RuntimeWarning, stacklevel=3)
        return self.step(x)


class CheckedStep:
    """`candidate(x)`, a faster form of the eager `step(x)` with the same effects, kept only if its
    first call reproduces one eager step (parameters, Adam state and generators restored in place
    around the reference); otherwise a warning (an error when strict) and the eager step from then on."""

    def __init__(self, candidate: Callable[[Tensor], Tensor], step: Callable[[Tensor], Tensor],
                 params: Sequence[Tensor], opt: torch.optim.Optimizer, generators: Sequence[torch.Generator],
                 what: str, strict: bool = False):
        self.candidate, self.step, self.params, self.opt = candidate, step, list(params), opt
        self.generators, self.what, self.strict = list(generators), what, strict
        self.checked, self.eager = False, False
        self.reason: Optional[str] = None

    @property
    def captured(self) -> bool:
        return self.checked

    def __call__(self, x: Tensor) -> Tensor:
        if self.checked:
            try:
                return self.candidate(x)
            except _compile_errors() as err:
                # a later compilation (another thread count, a batch of another size) failed; it
                # fails before the graph runs, so nothing was updated: the eager step from here
                self.checked = False
                return self._give_up(x, err)
        if self.eager:
            return self.step(x)
        snap = Snapshot(self.params, self.opt, self.generators)
        eager_ran = False
        try:
            reference = self.step(x).detach().clone()
            eager_ran = True
            grads = [p.grad.detach().clone() for p in self.params]
            snap.restore()
            out = self.candidate(x)
            if not (_close([out], [reference], OUT_ATOL, OUT_RTOL) and _grads_close(self.params, grads)):
                raise CaptureError(f"the {self.what}'s first result differs from the eager step's")
        except Exception as err:  # noqa: BLE001 - any failure means: use the eager step
            snap.restore()
            if not eager_ran and is_out_of_memory(err):
                raise  # the eager step itself does not fit: nothing to fall back to
            return self._give_up(x, err)
        self.checked = True
        return out

    def _give_up(self, x: Tensor, err: BaseException) -> Tensor:
        self.eager = True
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        self.reason = f"{type(err).__name__}: {first[:300]}"
        if self.strict:
            raise CaptureError(f"fast=true: the {self.what} failed ({self.reason})") from err
        warnings.warn(f"vaexp: the {self.what} failed ({self.reason}); continuing with the eager step "
                      f"(set fast=false to skip the attempt)", RuntimeWarning, stacklevel=3)
        return self.step(x)


def _compile_errors() -> tuple:
    """The exceptions torch.compile raises while compiling (Dynamo's, with the backend's wrapped)."""
    import torch._dynamo.exc

    return (torch._dynamo.exc.TorchDynamoException,)


def fast_step(fast_setting, device: torch.device, step, rows: Optional[int] = None):
    """The fast form of `step` (a LoneStep or StackedStep) that the setting and device call for, or
    None (run the eager step): on CUDA the captured graph; on a CPU with fast=auto the compiled step
    where the step has one (vaexp.training.step.LoneStep.compiled), the run computes at least
    COMPILE_MIN_ROWS sample rows (`rows`: steps x M·K x batch; None: no estimate, compile) and
    VAEXP_COMPILE is not 0. The choice depends on the config only, so a resumed run makes it again."""
    if device.type == "cuda" or mode(fast_setting) != "auto":
        return captured_step(fast_setting, device, step.opt, step.params, step.generators, step)
    make = getattr(step, "compiled", None)
    if make is None or not runtime.compiling():
        return None
    if rows is not None and rows < COMPILE_MIN_ROWS:
        return None
    candidate = make()
    if candidate is None:
        return None
    return CheckedStep(candidate, step, step.params, step.opt, step.generators, "compiled training step")


def captured_step(fast_setting, device: torch.device, opt: torch.optim.Optimizer, params: Sequence[Tensor],
                  generators: Sequence[torch.Generator], step: Callable[[Tensor], Tensor]) -> Optional[CapturedStep]:
    """The captured form of `step` when the setting and the device call for it (the optimizer is
    made capturable then), else None: the caller runs its eager step."""
    if not wanted(fast_setting, device):
        return None
    make_capturable(opt, device)
    return CapturedStep(step, params, opt, generators, strict=mode(fast_setting) == "true")
