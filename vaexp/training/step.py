"""The training step, for one run or a stack of runs, behind one interface.

``step(x)`` takes every run's batch, x [N, B, x_dim], makes one Adam step of every run and
returns the step metrics [N, 4] on the device (columns: METRICS, batch means). N = 1 is
:class:`LoneStep`: the model's own log_weights and Adam, so a lone run computes exactly what it
always has; N > 1 is :class:`StackedStep` on a vaexp.models.stacked.StackedVAE. Both expose
``opt``, ``params``, ``generators`` (what a captured graph must know), ``set_lr``, ``sync`` (write
the parameters into the runs' own models), ``optimizer_state(n)`` (run n's Adam state as a lone
eager Adam writes it) and ``finite()``. Invariant: every run's θ and φ gradients come from its own
objective and estimator (vaexp.estimators); runs share no parameter, so in a stack the gradient
of the sum of the runs' losses is each run's own.
"""

from __future__ import annotations

import json
import math
import types
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from vaexp import rundir, runtime
from vaexp.errors import VaexpError
from vaexp.estimators import Estimator, Losses, get_estimator, gradients, surrogate_losses
from vaexp.models.base import sample_encoder
from vaexp.models.burda import VAE
from vaexp.models.stacked import StackedVAE, from_models, to_model
from vaexp.objectives import Objective, make_objective
from vaexp.training import capture, cse

# The columns of a step's metrics (and of the loop's accumulators): batch means.
METRICS = ("training bound", "phi bound", "theta gradient norm", "phi gradient norm")


def adam(params, sch, device: torch.device) -> torch.optim.Adam:
    """Adam with the schedule's settings. On a CPU the fused kernel (one pass per parameter
    instead of ~10; about 4x faster for Burda's models on 2 cores, same update up to float
    rounding); on CUDA the default, which vaexp.training.capture makes capturable."""
    fused = True if device.type == "cpu" else None
    return torch.optim.Adam(params, lr=sch.lr, betas=(sch.beta1, sch.beta2), eps=sch.eps, fused=fused)


def _norm(grads: Sequence[Tensor]) -> Tensor:
    """The norm of the per-parameter norms (those in one torch._foreach_norm call)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(grads))))


def train_step(model: nn.Module, obj: Objective, est: Estimator, opt: torch.optim.Optimizer,
               theta: List[Tensor], phi: List[Tensor], x: Tensor, m: int, k: int,
               gen: torch.Generator) -> Tensor:
    """One Adam step of a lone model; returns its metrics [4] (see METRICS) on the device."""
    lws = model.log_weights(x, m, k, need_bar=est.needs_lw_bar, generator=gen, need_score=est.needs_score)
    losses = surrogate_losses(obj, est, lws.lw, lws.lw_bar, lws.log_q_score)
    g_theta, g_phi = gradients(losses, theta, phi)
    for p, g in zip(theta + phi, g_theta + g_phi):
        p.grad = g
    opt.step()
    return torch.stack([losses.bound.mean(), losses.phi_bound.mean(), _norm(g_theta), _norm(g_phi)])


def compiled_form(device: torch.device, compiling: bool) -> Optional[str]:
    """The compiled CPU step's form where vaexp may compile (`compiling`), recorded with a run's
    kernels (vaexp.training.run.kernels): "graph", Adam included in one graph (CompiledLoneStep);
    checkpoints from before 2026-12-03 ran "autograd" (the forward compiled, autograd's backward,
    the fused Adam kernel); None: no compiled step."""
    return "graph" if compiling and device.type == "cpu" else None


def params_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


class StepSpec(NamedTuple):
    """What one run's step computes: its objective (name, beta), estimator (name, alpha) and (M, K)."""

    objective: str
    estimator: str
    m: int
    k: int
    beta: float = 0.5
    alpha: Optional[float] = None  # gdreg's estimator.alpha (None: the estimator's default)


def spec_of(cfg) -> StepSpec:
    alpha = cfg.estimator.get("alpha")
    return StepSpec(cfg.objective.name, cfg.estimator.name, int(cfg.m), int(cfg.k), float(cfg.beta),
                    None if alpha is None else float(alpha))


def stack_key(cfg) -> Optional[str]:
    """Runs with the same key can share one StackedStep; None: this run never stacks (the
    analytic model has no Linear layers to stack; a resume continues one run as it was)."""
    if cfg.model.name == "gaussian" or cfg.get("resume"):
        return None
    shared = {key: value for key, value in rundir.as_dict(cfg).items() if not rundir.covers(rundir.STACK_PER_RUN, key)}
    shared["mk"] = int(cfg.m) * int(cfg.k)
    return json.dumps(shared, sort_keys=True, default=str)


# ============================================================================ a lone run

class LoneStep:
    """One run: its model, its Adam, its ε generator. x [1, B, x_dim] -> [1, 4]."""

    def __init__(self, model: nn.Module, spec: StepSpec, opt: torch.optim.Optimizer, generator: torch.Generator):
        self.model, self.opt, self.spec = model, opt, spec
        self.obj, self.est = make_objective(spec.objective, spec.beta), get_estimator(spec.estimator, spec.alpha)
        self.theta, self.phi = model.theta_parameters(), model.phi_parameters()
        self.params = self.theta + self.phi
        self.generators = [generator]

    def __call__(self, x: Tensor) -> Tensor:
        runtime.adapt_threads()  # the thread governor's count, applied between steps
        return train_step(self.model, self.obj, self.est, self.opt, self.theta, self.phi, x[0],
                          self.spec.m, self.spec.k, self.generators[0]).unsqueeze(0)

    def compiled(self) -> Optional["CompiledLoneStep"]:
        """This step, Adam's update included, as one torch.compile'd graph (:class:`CompiledLoneStep`),
        or None for a model other than Burda's VAE (the analytic model's steps are microseconds:
        nothing to repay a compilation) or an optimizer other than vaexp's plain fused Adam."""
        if not isinstance(self.model, VAE) or not _plain_adam(self.opt, self.params):
            return None
        return CompiledLoneStep(self)

    def set_lr(self, lr: float) -> None:
        capture.set_lr(self.opt, lr)

    def sync(self, models: Sequence[nn.Module]) -> None:
        pass  # the run's model is the one trained

    def optimizer_state(self, n: int) -> Dict:
        return capture.portable_state_dict(self.opt)

    def finite(self) -> List[bool]:
        return [params_finite(self.model)]


class _Pieces(nn.Module):
    """The model's sampler and log joint as one forward, so torch.func.functional_call can run
    either with any parameters (the whole step's, or the decoder's stopped)."""

    def __init__(self, model: nn.Module, spec: StepSpec, est: Estimator):
        super().__init__()
        self.m, self.spec, self.est = model, spec, est

    def forward(self, what: str, x: Tensor, arg: List[Tensor]):
        if what == "sample":
            return sample_encoder(self.m.encoder, x, self.spec.m, self.spec.k, self.est.needs_lw_bar, eps=arg,
                                  need_score=self.est.needs_score)
        return self.m.log_joint(x, arg)


def _plain_adam(opt: torch.optim.Optimizer, params: Sequence[Tensor]) -> bool:
    """Whether `opt` is the plain fused CPU Adam (vaexp's `adam`) over exactly `params`: the update
    the compiled step writes into its graph (beyond it, weight decay, amsgrad, hooks: the eager step)."""
    if type(opt) is not torch.optim.Adam or len(opt.param_groups) != 1 or opt._optimizer_step_pre_hooks \
            or opt._optimizer_step_post_hooks:
        return False
    g = opt.param_groups[0]
    plain = (g.get("fused") is True and not g["amsgrad"] and not g["maximize"] and not g["capturable"]
             and not g["differentiable"] and not g.get("decoupled_weight_decay", False) and g["weight_decay"] == 0
             and not torch.is_tensor(g["lr"]) and not torch.is_tensor(g["betas"][0]))
    same = len(g["params"]) == len(params) and {id(p) for p in g["params"]} == {id(p) for p in params}
    return plain and same and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)


class CompiledLoneStep:
    """A LoneStep as one torch.compile'd graph: the loss, both gradients (torch.func.grad, so no
    autograd engine at run time), the gradient norms and Adam's update of parameters and state in
    place. On a CPU this cuts the per-op dispatch (at k = 5 most of the step) and fuses the
    elementwise work (tanh, the likelihood, log q, Adam). The ε are drawn eagerly from the run's
    generator in the order and shapes log_weights draws them (so the same values). With two
    surrogates (stl, dreg, the rws family, split objectives) the loss is L_θ(θ, stop(z)) +
    L_φ(stop(θ), φ): the log-weights once with the samples stopped, once with the decoder's
    parameters stopped (the same values, computed once: vaexp.training.cse), so one gradient gives
    ∂L_θ/∂θ and ∂L_φ/∂φ. Adam is torch's fused CPU update written out (the same
    formula, its state the optimizer's own tensors in opt.state, so checkpoints and the eager step
    see one optimizer; equal to the fused kernel up to float rounding); its scalars (lr / (1 − β1^t),
    √(1 − β2^t)) are computed here, in double, once per step. Same contract as LoneStep, p.grad
    left as after opt.step(); vaexp.training.capture.fast_step runs it behind a first-step check of
    its gradients against the eager step's. One graph or none (fullgraph=True): a graph break fails
    that check instead of running the step in pieces; under a TorchDispatchMode, where Dynamo
    traces nothing, the same function runs uncompiled.

    Dynamo's guards: only the inputs' tensor properties and the global state (grad mode, the
    thread count) are checked per call (all of them cost ~0.35 ms at k = 5: module attributes,
    closures, ~70 tensors' aliasing). That is safe because everything else the graph depends on
    (model, objective, estimator, kernel modes) is fixed for the life of this object, and each
    object compiles its own copy of the step's code, so no other run's graph can match it."""

    _copies = 0

    def __init__(self, lone: LoneStep):
        self.lone, self.opt, self.params, self.generators = lone, lone.opt, lone.params, lone.generators
        model, spec, obj, est = lone.model, lone.spec, lone.obj, lone.est
        shared = est.name == "reparam" and not obj.split
        pieces = _Pieces(model, spec, est)
        index = {id(p): i for i, p in enumerate(self.params)}
        names = [(name, index[id(p)]) for name, p in pieces.named_parameters()]
        decoder = {name for name, _ in names if name.startswith("m.decoder.")}
        n_theta = len(lone.theta)
        group = self.opt.param_groups[0]
        beta1, beta2, eps_adam = group["betas"][0], group["betas"][1], group["eps"]

        def loss(params: Dict[str, Tensor], x: Tensor, eps: List[Tensor]):
            zs, log_q, log_q_bar, log_q_score = functional_call(pieces, params, ("sample", x, eps))
            if shared:  # one surrogate for θ and φ
                losses = surrogate_losses(obj, est, functional_call(pieces, params, ("joint", x, zs)) - log_q, None)
                return losses.theta_loss, (losses.bound.mean(), losses.phi_bound.mean())
            # θ's gradient never flows through the samples, φ's never through the decoder's parameters
            lw_theta = functional_call(pieces, params, ("joint", x, [z.detach() for z in zs])) - log_q.detach()
            frozen = {name: (p.detach() if name in decoder else p) for name, p in params.items()}
            log_p = functional_call(pieces, frozen, ("joint", x, zs))
            lw_bar = log_p - log_q_bar if est.needs_lw_bar else None
            theta_bound = obj.theta(lw_theta)
            phi = surrogate_losses(obj, est, log_p - log_q, lw_bar, log_q_score)
            return -theta_bound.mean() + phi.phi_loss, (theta_bound.detach().mean(), phi.phi_bound.mean())

        def step(params: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor], steps: List[Tensor],
                 x: Tensor, eps: List[Tensor], scalars: Tensor):
            named = torch.func.grad(loss, has_aux=True)
            by_name, (bound, phi_bound) = named({name: params[i] for name, i in names}, x, eps)
            grads: List[Any] = [None] * len(params)
            for name, i in names:
                grads[i] = by_name[name]
            with torch.no_grad():
                # torch's fused Adam (aten _fused_adam_): lerp, then p -= s·m / (√v / √(1 − β2^t) + ε)
                step_size, root = scalars[0], scalars[1]
                for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
                    t.add_(1)
                    m.lerp_(g, 1 - beta1)
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    p.sub_(step_size * m / (v.sqrt() / root + eps_adam))
            # ATen's norms (the compiler's own sums would be split between threads, its bits depending
            # on their number, and measured slower: 0.35 ms at k = 5 against 0.1 + Adam's 0.15)
            norms = [_norm(grads[:n_theta]), _norm(grads[n_theta:])]
            return torch.stack([bound, phi_bound] + norms), grads

        # Dynamo keeps compiled code per code object: a copy of `step`'s for each object (see the
        # class docstring). One run at a time is trained here, so start each from an empty cache.
        CompiledLoneStep._copies += 1
        code = step.__code__.replace(co_name=f"compiled_step_{CompiledLoneStep._copies}")
        own = types.FunctionType(code, step.__globals__, code.co_name, step.__defaults__, step.__closure__)
        torch._dynamo.reset()
        options: Dict[str, Any] = {}
        if hasattr(torch.compiler, "keep_portable_guards_unsafe"):  # older torch: every guard, slower
            options["guard_filter_fn"] = torch.compiler.keep_portable_guards_unsafe
        if cse.PASS is not None:
            options["post_grad_custom_pre_pass"] = cse.PASS
        # fullgraph: a graph break would run the step in pieces, slower and unseen; failing instead,
        # the first-call check falls back to the eager step with a warning that names the cause
        self.forward = runtime.compile(own, dynamic=False, fullgraph=True, options=options)
        self.uncompiled = own  # under a TorchDispatchMode (FlopCounterMode, the benchmark's GEMM
        # recorder), where Dynamo traces nothing: the same function, run eagerly
        self.state: Optional[tuple] = None

    def _state(self) -> tuple:
        """Adam's per-parameter state lists (created as Adam creates them when the run has none),
        rebuilt whenever opt.state's tensors were replaced (a loaded state_dict)."""
        opt, first = self.opt, self.params[0]
        now = opt.state.get(first)
        if self.state is None or now is None or now.get("exp_avg") is not self.state[0][0] \
                or now.get("step") is not self.state[2][0]:
            for p in self.params:
                s = opt.state[p]
                if not s:  # torch.optim.Adam's lazy initialisation (a fused Adam's step is a float32 tensor)
                    s["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            states = [opt.state[p] for p in self.params]
            self.state = ([s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                          [s["step"] for s in states])
        return self.state

    def __call__(self, x: Tensor) -> Tensor:
        runtime.adapt_threads()
        lone, x = self.lone, x[0]
        spec, gen, w = lone.spec, self.generators[0], lone.params[0]
        eps = [torch.randn((spec.m, spec.k, x.shape[0], d), generator=gen, device=x.device, dtype=w.dtype)
               for d in lone.model.latents]
        exp_avgs, exp_avg_sqs, steps = self._state()
        g = self.opt.param_groups[0]
        t = float(steps[0]) + 1  # a CPU tensor: no device to wait for
        scalars = torch.tensor([g["lr"] / (1 - g["betas"][0] ** t), math.sqrt(1 - g["betas"][1] ** t)])
        with torch.no_grad():  # the graph differentiates inside itself (torch.func.grad)
            fn = self.uncompiled if torch._C._len_torch_dispatch_stack() > 0 else self.forward
            out, grads = fn(self.params, exp_avgs, exp_avg_sqs, steps, x, eps, scalars)
        for p, grad in zip(self.params, grads):
            p.grad = grad  # as opt.step() leaves them (the first-step check reads them)
        return out.unsqueeze(0)


# ============================================================================ a stack of runs

class _SpecGroup:
    """The runs of a stack with the same spec: their log-weights are reduced together."""

    def __init__(self, index: List[int], spec: StepSpec, device: torch.device):
        self.index, self.m, self.k = index, spec.m, spec.k
        self.obj: Objective = make_objective(spec.objective, spec.beta)
        self.est: Estimator = get_estimator(spec.estimator, spec.alpha)
        contiguous = index == list(range(index[0], index[0] + len(index)))
        self.slice = slice(index[0], index[0] + len(index)) if contiguous else None
        self.select = None if contiguous else torch.tensor(index, device=device)

    def view(self, t: Tensor, batch: int) -> Tensor:
        """[N, M·K, B] -> this group's [M, K, G·B] (runs side by side along the batch axis)."""
        sub = t[self.slice] if self.slice is not None else t.index_select(0, self.select)
        g = len(self.index)
        if g == 1:
            return sub.reshape(self.m, self.k, batch)
        return sub.reshape(g, self.m, self.k, batch).permute(1, 2, 0, 3).reshape(self.m, self.k, g * batch)


def _norms(grads: Sequence[Tensor], n: int) -> Tensor:
    """Per-run gradient norms [N] (as train_step: the norm of the per-parameter norms)."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.reshape(n, -1), dim=1)
                                                 for g in grads]), dim=0)


class StackedStep:
    """N runs of one shape and one M·K as one StackedVAE with one Adam over the stacked tensors
    (N independent Adams: the update is elementwise, and every run has the same step count and
    learning rate). x [N, B, x_dim] -> [N, 4]."""

    def __init__(self, stack: StackedVAE, specs: Sequence[StepSpec], opt: torch.optim.Optimizer,
                 generators: Sequence[torch.Generator], templates: Optional[Sequence[Dict]] = None):
        if len(specs) != stack.n or len(generators) != stack.n:
            raise VaexpError("one spec and one generator per stacked model")
        mks = {s.m * s.k for s in specs}
        if len(mks) != 1:
            raise VaexpError(f"stacked runs need the same M*K, got {sorted(mks)}")
        self.stack, self.opt, self.generators = stack, opt, list(generators)
        self.templates = list(templates) if templates is not None else None
        self.mk = mks.pop()
        device = stack.decoder[0].logits.bias.device
        by_spec: Dict[StepSpec, List[int]] = {}
        for i, spec in enumerate(specs):
            by_spec.setdefault(spec, []).append(i)
        self.groups = [_SpecGroup(index, spec, device) for spec, index in by_spec.items()]
        order = [i for g in self.groups for i in g.index]
        self.inverse = None if order == sorted(order) else torch.tensor(
            [order.index(i) for i in range(stack.n)], device=device)
        self.need_bar = any(g.est.needs_lw_bar for g in self.groups)
        self.need_score = any(g.est.needs_score for g in self.groups)
        self.theta, self.phi = stack.theta_parameters(), stack.phi_parameters()
        self.params = self.theta + self.phi
        self.named = list(stack.named_parameters())

    def __call__(self, x: Tensor) -> Tensor:
        runtime.adapt_threads()
        n, batch = x.shape[0], x.shape[1]
        eps = self.stack.draw_eps(self.generators, self.mk, batch)
        lws = self.stack.log_weights(x, eps, need_bar=self.need_bar, need_score=self.need_score)
        theta_loss: Any = 0.0
        phi_loss: Any = 0.0
        shared = True  # every group's φ loss is its θ loss (reparam on a non-split objective)
        bounds, phi_bounds = [], []
        for g in self.groups:
            size = len(g.index)
            lw_bar = g.view(lws.lw_bar, batch) if g.est.needs_lw_bar else None
            score = g.view(lws.log_q_score, batch) if g.est.needs_score else None
            losses = surrogate_losses(g.obj, g.est, g.view(lws.lw, batch), lw_bar, score)
            # -mean over G·B examples, times G: the sum over the group's runs of each run's loss.
            theta_loss = theta_loss + size * losses.theta_loss
            shared = shared and losses.phi_loss is losses.theta_loss
            phi_loss = phi_loss + size * losses.phi_loss
            bounds.append(losses.bound.reshape(size, batch).mean(1))
            phi_bounds.append(losses.phi_bound.reshape(size, batch).mean(1))
        total = Losses(theta_loss, theta_loss if shared else phi_loss, None, None)
        g_theta, g_phi = gradients(total, self.theta, self.phi)
        for p, g in zip(self.params, g_theta + g_phi):
            p.grad = g
        self.opt.step()
        bound, phi_bound = torch.cat(bounds), torch.cat(phi_bounds)
        if self.inverse is not None:
            bound, phi_bound = bound[self.inverse], phi_bound[self.inverse]
        return torch.stack([bound, phi_bound, _norms(g_theta, n), _norms(g_phi, n)], dim=1)

    def set_lr(self, lr: float) -> None:
        capture.set_lr(self.opt, lr)

    def sync(self, models: Sequence[nn.Module]) -> None:
        self.stack.copy_to(models)

    def optimizer_state(self, n: int) -> Dict:
        if self.templates is None:
            raise VaexpError("StackedStep was built without the runs' optimizer templates")
        return model_optimizer_state(self.opt, self.named, n, self.templates[n])

    def finite(self) -> List[bool]:
        n = self.stack.n
        return torch.stack([torch.isfinite(p).reshape(n, -1).all(1) for p in self.params]).all(0).tolist()


# -- the stacked Adam's state, to and from the runs' own ------------------------------------------

def stack_optimizer_states(opt: torch.optim.Optimizer, named_params: Sequence, states: Sequence[Dict]) -> None:
    """Load N per-run Adam state_dicts (indexed in the VAE's parameter order) into the Adam over
    the stacked parameters `named_params` ((name, parameter) in the same order)."""
    for j, (name, p) in enumerate(named_params):
        per = [sd["state"].get(j, sd["state"].get(str(j))) for sd in states]
        if all(s is None for s in per):
            continue
        if any(s is None for s in per):
            raise VaexpError("stacked runs must all have optimizer state, or none")
        entry = {}
        for key in per[0]:
            values = [s[key] for s in per]
            if key == "step":
                if len({float(v) for v in values}) != 1:
                    raise VaexpError("stacked runs must have made the same number of optimizer steps")
                entry[key] = values[0].detach().clone()
            else:
                entry[key] = from_models(name, [v.detach().to(p.device) for v in values])
        opt.state[p] = entry


def model_optimizer_state(opt: torch.optim.Optimizer, named_params: Sequence, n: int, template: Dict) -> Dict:
    """Run n's Adam state_dict, as a lone run's eager Adam would write it: `template` is the
    state_dict of a fresh Adam over that run's VAE (param_groups, ids); lr the current one."""
    state = {}
    for j, (name, p) in enumerate(named_params):
        s = opt.state.get(p)
        if not s:
            continue
        state[j] = {key: (v.detach().to("cpu", copy=True) if key == "step"
                          else to_model(name, v.detach(), n).contiguous().clone())
                    for key, v in s.items()}
    groups = []
    for tg, g in zip(template["param_groups"], opt.param_groups):
        tg = dict(tg)
        tg["lr"] = float(g["lr"])
        groups.append(tg)
    return {"state": state, "param_groups": groups}


# ============================================================================ building the step

def make_step(models: Sequence[nn.Module], specs: Sequence[StepSpec], generators: Sequence[torch.Generator],
              saved_optimizers: Sequence[Optional[Dict]], sch, device: torch.device):
    """The step for these runs (their models, specs, ε generators and checkpointed Adam states,
    all or none): a LoneStep for one run, a StackedStep for several."""
    if len(models) == 1:
        opt = adam(models[0].parameters(), sch, device)
        if saved_optimizers[0] is not None:
            opt.load_state_dict(saved_optimizers[0])
        return LoneStep(models[0], specs[0], opt, generators[0])
    templates = [adam(m.parameters(), sch, device).state_dict() for m in models]
    stack = StackedVAE(models).to(device)
    opt = adam(stack.parameters(), sch, device)  # the lone runs' Adam, over the stacked tensors
    if any(s is not None for s in saved_optimizers):
        stack_optimizer_states(opt, list(stack.named_parameters()), list(saved_optimizers))
    return StackedStep(stack, specs, opt, generators, templates)
