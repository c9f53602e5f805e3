"""Stacked models: several runs of the same shape trained as one model with a model axis.

At batch 20 a training step is launch-bound: N runs trained one after another pay N times the
per-op overhead for very little arithmetic each. Here the N runs' Linear layers become one
layer with weights [N, out, in] (``torch.baddbmm``), so the forward and backward passes cost
one set of kernels for all N; the log-weights come out as lw[N, M·K, B].

Each run keeps everything that makes it the run it would be alone:

* its own initialisation (``torch.manual_seed(seed)`` then the model, as ``vaexp.train.build``),
  its own ε generator (seeded with its seed; drawn per run in the order a lone run draws them),
  its own epoch binarisation and permutation (from ``train.epoch_seed(seed, epoch)``);
* its own objective and estimator, applied to its own view lw[n] → [M_n, K_n, B] through
  ``vaexp.estimators.surrogate_losses`` (runs with the same objective, estimator, M and K are
  reduced together, laid side by side along the batch axis: the bounds are per example, so that
  is the same computation). θ and φ gradients come from the sums over runs of the θ and φ
  surrogates via ``vaexp.estimators.gradients``; the runs share no parameter, so the gradient of
  a sum with respect to run n's slice is run n's own gradient;
* one ``torch.optim.Adam`` over the stacked tensors is N independent Adams: the update is
  elementwise and every run has the same step count and learning rate.

So a stacked run computes what the same run trained alone computes, up to float rounding
(batched and plain matmuls may sum in different orders): tests/test_stack.py checks parameters,
bounds and gradient norms against separate runs.

Which runs stack (:func:`stack_key`): the same dataset, model (the Bernoulli VAEs; the analytic
``gaussian`` model never stacks), schedule, batch size, device, ``log_every``, ``fast`` and the
same M·K. Seeds, objectives, estimators, beta, M and K (with M·K fixed) and the eval settings
may differ: e.g. a seed sweep, reparam vs stl vs dreg, or the M·K = 64 line.

Outputs are those of separate runs: each run directory gets its config.yaml, TensorBoard events,
checkpoint.pt (the run's slice as a plain VAE state_dict, its own Adam state, its generators),
metrics.json and test_log_px.pt, so ``vaexp eval <dir>`` and ``resume=<dir>`` work on any of them
as on any run. metrics.json's ``train.stacked_with`` names the other runs of the stack.

From the command line: ``vaexp train -m stack=true seed=0,1,2,3`` (any sweep). Hydra's basic
launcher runs the jobs one by one in this process; when the first job of a compatible group
starts, it trains the whole group stacked, and the group's other jobs, when their turn comes,
report the results already written (or the run's own error). A run whose bound turns NaN stops
being checkpointed at its last good checkpoint and its job fails with the usual message; the
others go on. Other launchers run every job alone (stack=true changes nothing there).
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from vaexp.errors import VaexpError
from vaexp.estimators import Estimator, Losses, get_estimator, gradients, surrogate_losses
from vaexp.models import (LogWeights, VAE, _HALF_LOG_2PI, bernoulli_log_prob, gaussian_log_prob,
                          std_normal_log_prob)
from vaexp.objectives import Objective, make_objective


# ============================================================================ the stacked model

class StackedLinear(nn.Module):
    """N Linear layers of one shape: input [N, ..., in] → [N, ..., out].

    The weight is held *transposed*, [N, in, out] (bias [N, out]): then baddbmm's weight
    gradient comes out contiguous, and Adam's elementwise updates run on contiguous memory
    (with [N, out, in] they get a transposed view and take PyTorch's slow strided path).
    :func:`to_model` / :func:`from_models` convert a slice to and from nn.Linear's [out, in].
    """

    def __init__(self, linears: Sequence[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(from_models("weight", [lin.weight.detach() for lin in linears]))
        self.bias = nn.Parameter(from_models("bias", [lin.bias.detach() for lin in linears]))

    def forward(self, h: Tensor) -> Tensor:
        n, n_in = h.shape[0], h.shape[-1]
        out = torch.baddbmm(self.bias.unsqueeze(1), h.reshape(n, -1, n_in), self.weight)
        return out.reshape(*h.shape[:-1], self.weight.shape[2])


def to_model(name: str, stacked: Tensor, n: int) -> Tensor:
    """Slice n of a stacked parameter (or of its Adam state) in the lone model's layout."""
    return stacked[n].transpose(0, 1) if name.endswith("weight") else stacked[n]


def from_models(name: str, tensors: Sequence[Tensor]) -> Tensor:
    """The stacked tensor (stacked layout, contiguous) of N lone-model tensors."""
    if name.endswith("weight"):
        return torch.stack([t.transpose(0, 1) for t in tensors]).contiguous()
    return torch.stack(list(tensors)).contiguous()


def _stack_modules(modules: Sequence[nn.Module]) -> nn.Module:
    """A copy of modules[0] with every nn.Linear replaced by the StackedLinear of all modules'
    Linear at that place (activations work on any shape, so the rest is reused as it is)."""
    out = copy.deepcopy(modules[0])
    for name, sub in list(out.named_modules()):
        if isinstance(sub, nn.Linear):
            parent_name, _, child = name.rpartition(".")
            parent = out.get_submodule(parent_name) if parent_name else out
            setattr(parent, child, StackedLinear([m.get_submodule(name) for m in modules]))
    for name, sub in out.named_modules():
        if any(True for _ in sub.parameters(recurse=False)) and not isinstance(sub, StackedLinear):
            raise VaexpError(f"cannot stack {type(sub).__name__} at {name!r}: only Linear layers hold parameters")
    return out


class StackedVAE(nn.Module):
    """N ``models.VAE`` of one shape as one module with a leading model axis. Parameter names
    are the VAE's (``encoder.0.net.0.weight`` ...), each with a leading axis of size N (weights
    transposed: see StackedLinear)."""

    def __init__(self, models: Sequence[VAE]):
        super().__init__()
        if not models:
            raise VaexpError("nothing to stack")
        first = models[0]
        for m in models:
            if not isinstance(m, VAE):
                raise VaexpError(f"only vaexp.models.VAE models stack, not {type(m).__name__}")
            shapes = [(n, p.shape) for n, p in m.named_parameters()]
            if shapes != [(n, p.shape) for n, p in first.named_parameters()]:
                raise VaexpError("stacked models must have the same architecture")
        self.n = len(models)
        self.latents, self.x_dim = list(first.latents), first.x_dim
        self.encoder = _stack_modules([m.encoder for m in models])
        self.decoder = _stack_modules([m.decoder for m in models])

    def theta_parameters(self) -> List[nn.Parameter]:
        return list(self.decoder.parameters())

    def phi_parameters(self) -> List[nn.Parameter]:
        return list(self.encoder.parameters())

    @torch.no_grad()
    def copy_to(self, models: Sequence[nn.Module]) -> None:
        """Write model n's slice into models[n] (a VAE of the same shape)."""
        mine = dict(self.named_parameters())
        for n, model in enumerate(models):
            for name, p in model.named_parameters():
                p.copy_(to_model(name, mine[name], n))

    def draw_eps(self, generators: Sequence[torch.Generator], mk: int, batch: int) -> List[Tensor]:
        """ε per layer, [N, M·K, B, D_i]; model n's from generators[n], in the order a lone VAE
        draws them (layer by layer), so its values are those of the lone run's [M, K, B, D_i]."""
        w = self.decoder[0].logits.bias
        eps = []
        for d in self.latents:
            e = torch.empty(self.n, mk, batch, d, device=w.device, dtype=w.dtype)
            for n, g in enumerate(generators):
                e[n].normal_(generator=g)
            eps.append(e)
        return eps

    def log_weights(self, x: Tensor, eps: List[Tensor], need_bar: bool = False) -> LogWeights:
        """x [N, B, x_dim], eps from draw_eps → lw [N, M·K, B] (and lw_bar, as VAE.log_weights)."""
        h: Tensor = x
        log_q: Any = 0.0
        log_q_bar: Any = 0.0
        zs: List[Tensor] = []
        for i, layer in enumerate(self.encoder):
            mu, logsig = layer(h)
            if i == 0:  # the first layer runs once per example: broadcast over the samples
                mu, logsig = mu.unsqueeze(1), logsig.unsqueeze(1)
            e = eps[i]
            z = mu + torch.exp(logsig) * e
            log_q = log_q + (-0.5 * e ** 2 - logsig - _HALF_LOG_2PI).sum(-1)
            if need_bar:
                if i == 0:
                    mu_s, logsig_s = mu.detach(), logsig.detach()
                else:
                    frozen = {n: p.detach() for n, p in layer.named_parameters()}
                    mu_s, logsig_s = functional_call(layer, frozen, (h,))
                log_q_bar = log_q_bar + gaussian_log_prob(z, mu_s, logsig_s)
            zs.append(z)
            h = z
        log_p = bernoulli_log_prob(x.unsqueeze(1), self.decoder[0](zs[0]))
        for i in range(1, len(zs)):
            mu, logsig = self.decoder[i](zs[i])
            log_p = log_p + gaussian_log_prob(zs[i - 1], mu, logsig)
        log_p = log_p + std_normal_log_prob(zs[-1])
        return LogWeights(log_p - log_q, log_p - log_q_bar if need_bar else None, zs)


# ============================================================================ the optimizer's state

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


# ============================================================================ the stacked step

class Member(NamedTuple):
    """One run of a stack: its objective (name, beta), estimator and (M, K)."""

    objective: str
    estimator: str
    m: int
    k: int
    beta: float = 0.5


class _Group:
    """Runs with the same objective, estimator, M and K: reduced together."""

    def __init__(self, index: List[int], member: Member, device: torch.device):
        self.index = index
        self.obj: Objective = make_objective(member.objective, member.beta)
        self.est: Estimator = get_estimator(member.estimator)
        self.m, self.k = member.m, member.k
        contiguous = index == list(range(index[0], index[0] + len(index)))
        self.slice = slice(index[0], index[0] + len(index)) if contiguous else None
        self.select = None if contiguous else torch.tensor(index, device=device)

    def view(self, t: Tensor, batch: int) -> Tensor:
        """[N, M·K, B] → this group's [M, K, G·B] (runs side by side along the batch axis)."""
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
    """One Adam step of every run of the stack; `step(x)` with x [N, B, x_dim] returns
    [N, 4] = per run [θ bound, φ bound, |∇θ|, |∇φ|] (batch means, on the device), the stacked
    counterpart of ``vaexp.train.train_step``."""

    def __init__(self, stack: StackedVAE, members: Sequence[Member], opt: torch.optim.Optimizer,
                 generators: Sequence[torch.Generator]):
        if len(members) != stack.n or len(generators) != stack.n:
            raise VaexpError("one member and one generator per stacked model")
        mks = {mb.m * mb.k for mb in members}
        if len(mks) != 1:
            raise VaexpError(f"stacked runs need the same M*K, got {sorted(mks)}")
        self.stack, self.opt, self.generators = stack, opt, list(generators)
        self.mk = mks.pop()
        device = stack.decoder[0].logits.bias.device
        by_member: Dict[Member, List[int]] = {}
        for i, mb in enumerate(members):
            by_member.setdefault(mb, []).append(i)
        self.groups = [_Group(index, mb, device) for mb, index in by_member.items()]
        order = [i for g in self.groups for i in g.index]
        self.inverse = None if order == sorted(order) else torch.tensor(
            [order.index(i) for i in range(stack.n)], device=device)
        self.need_bar = any(g.est.needs_lw_bar for g in self.groups)
        self.theta, self.phi = stack.theta_parameters(), stack.phi_parameters()

    def __call__(self, x: Tensor) -> Tensor:
        n, batch = x.shape[0], x.shape[1]
        eps = self.stack.draw_eps(self.generators, self.mk, batch)
        lws = self.stack.log_weights(x, eps, need_bar=self.need_bar)
        theta_loss: Any = 0.0
        phi_loss: Any = 0.0
        shared = True  # every group's φ loss is its θ loss (reparam on a non-split objective)
        bounds, phi_bounds = [], []
        for g in self.groups:
            size = len(g.index)
            lw_bar = g.view(lws.lw_bar, batch) if g.est.needs_lw_bar else None
            losses = surrogate_losses(g.obj, g.est, g.view(lws.lw, batch), lw_bar)
            # -mean over G·B examples, times G: the sum over the group's runs of each run's loss.
            theta_loss = theta_loss + size * losses.theta_loss
            shared = shared and losses.phi_loss is losses.theta_loss
            phi_loss = phi_loss + size * losses.phi_loss
            bounds.append(losses.bound.reshape(size, batch).mean(1))
            phi_bounds.append(losses.phi_bound.reshape(size, batch).mean(1))
        total = Losses(theta_loss, theta_loss if shared else phi_loss, None, None)
        g_theta, g_phi = gradients(total, self.theta, self.phi)
        for p, g in zip(self.theta + self.phi, g_theta + g_phi):
            p.grad = g
        self.opt.step()
        bound, phi_bound = torch.cat(bounds), torch.cat(phi_bounds)
        if self.inverse is not None:
            bound, phi_bound = bound[self.inverse], phi_bound[self.inverse]
        return torch.stack([bound, phi_bound, _norms(g_theta, n), _norms(g_phi, n)], dim=1)


# ============================================================================ which runs stack

# Settings each run of a stack may have for itself; everything else must agree (plus M·K).
PER_RUN = ("seed", "objective", "estimator", "beta", "m", "k", "mk", "eval", "progress", "out_root",
           "sweep", "stack", "resume")


def stack_key(cfg) -> Optional[str]:
    """Runs with the same key can train as one stack; None: this run never stacks."""
    from vaexp import rundir

    if cfg.model.name == "gaussian" or cfg.get("resume"):
        return None
    plain = rundir.plain(cfg)
    shared = {key: value for key, value in plain.items() if key not in PER_RUN}
    shared["mk"] = int(cfg.m) * int(cfg.k)
    return json.dumps(shared, sort_keys=True, default=str)


def member(cfg) -> Member:
    return Member(cfg.objective.name, cfg.estimator.name, int(cfg.m), int(cfg.k), float(cfg.beta))


# ============================================================================ training a stack

@dataclass
class _Run:
    cfg: Any
    run_dir: Path
    model: Any = None
    eps_gen: Any = None
    eval_gen: Any = None
    obj: Any = None
    state: Dict = field(default_factory=dict)
    log: Any = None
    template: Dict = field(default_factory=dict)
    last_saved: Optional[int] = None
    error: Optional[str] = None
    saved_epoch_acc: Optional[Tensor] = None

    def kept(self) -> str:
        if self.last_saved is None:
            return f"no checkpoint had been written yet, so {self.run_dir} holds none"
        return f"the last good checkpoint (after {self.last_saved} steps) is kept in {self.run_dir}"


_METRIC_NAMES = ("training bound", "phi bound", "theta gradient norm", "phi gradient norm")


def train_stacked(cfgs: Sequence[Any], run_dirs: Sequence[Path]) -> List[Any]:
    """Train the runs `cfgs` (same stack_key, each with its run directory, config.yaml written)
    as one stacked model; returns per run its summary (as vaexp.train.train) or, for a run whose
    bound became non-finite, the NonFiniteBound error it would have raised alone."""
    from vaexp import checkpoint as ckpt
    from vaexp import evaluate as ev
    from vaexp import fast
    from vaexp import rundir
    from vaexp.data import binarize, load_dataset
    from vaexp.schedule import epoch_learning_rates
    from vaexp.train import (GracefulStop, Interrupted, NonFiniteBound, _INTERRUPT_AT, _log_eval,
                             _log_pictures, _log_train, _progress, adam, build, epoch_seed, resolve_device,
                             valid_bound)

    keys = {stack_key(c) for c in cfgs}
    if None in keys or len(keys) != 1:
        raise VaexpError("these runs cannot be stacked: they differ in a shared setting (see vaexp.stack.stack_key)")
    cfg0 = cfgs[0]
    n_models = len(cfgs)
    device = resolve_device(cfg0.device)
    data = load_dataset(cfg0.dataset, device)
    runs = [_Run(cfg, Path(d)) for cfg, d in zip(cfgs, run_dirs)]
    opt_states = []
    sch = cfg0.schedule
    for r in runs:
        r.model, lone_opt = build(r.cfg, data, device)  # the run's own init: manual_seed(seed), then the model
        r.template = lone_opt.state_dict()
        r.obj = make_objective(r.cfg.objective.name, r.cfg.beta)
        r.eps_gen = torch.Generator(device=device).manual_seed(r.cfg.seed)
        r.eval_gen = torch.Generator(device=device).manual_seed(r.cfg.seed + 1)
        r.state = {"epoch": 0, "step": 0, "global_step": 0, "wall_time": 0.0, "history": []}
        saved = ckpt.load(r.run_dir, map_location=device)
        if saved is not None:
            r.model.load_state_dict(saved["model"])
            opt_states.append(saved["optimizer"])
            ckpt.restore_rng_states(saved["rng"], {"eps": r.eps_gen, "eval": r.eval_gen})
            r.state = saved["state"]
            r.saved_epoch_acc = r.state.pop("epoch_acc", None)
            r.last_saved = r.state["global_step"]
        r.log = rundir.logger(r.run_dir, purge_step=r.state["global_step"] if saved is not None else None)
        if saved is None:
            r.log.scalars({"params/theta": sum(p.numel() for p in r.model.theta_parameters()),
                           "params/phi": sum(p.numel() for p in r.model.phi_parameters())}, 0)
    positions = {(r.state["epoch"], r.state["step"], r.state["global_step"]) for r in runs}
    if len(positions) != 1 or len(opt_states) not in (0, n_models):
        raise VaexpError(f"stacked runs must continue from the same point; their checkpoints are at "
                         f"(epoch, step, global step) {sorted(positions)}")
    if opt_states:
        print(f"vaexp: resuming {n_models} stacked runs at epoch {runs[0].state['epoch'] + 1}, "
              f"step {runs[0].state['step']}", flush=True)

    stack = StackedVAE([r.model for r in runs]).to(device)
    opt = adam(stack.parameters(), sch, device)  # the lone runs' Adam, over the stacked tensors
    params = list(stack.parameters())
    named = list(stack.named_parameters())
    if opt_states:
        stack_optimizer_states(opt, named, opt_states)
    stepper = StackedStep(stack, [member(r.cfg) for r in runs], opt, [r.eps_gen for r in runs])
    captured = fast.captured_step(cfg0.fast, device, opt, stepper.theta + stepper.phi,
                                  [r.eps_gen for r in runs], stepper)
    step_fn = captured if captured is not None else stepper

    lrs = epoch_learning_rates(sch)
    n_train, batch = data.train.shape[0], cfg0.batch_size
    steps_per_epoch = n_train // batch
    if steps_per_epoch < 1:
        raise VaexpError(f"batch_size={batch}: larger than the {n_train} training images; lower batch_size")
    seeds = [int(r.cfg.seed) for r in runs]
    unique_seeds = list(dict.fromkeys(seeds))
    seed_row = torch.tensor([unique_seeds.index(s) for s in seeds], device=device)
    model_rows = seed_row.unsqueeze(1)

    def alive() -> List[int]:
        return [i for i, r in enumerate(runs) if r.error is None]

    def save(i: int, epoch_acc: Tensor) -> None:
        r = runs[i]
        ckpt.atomic_save({"model": r.model.state_dict(),
                          "optimizer": model_optimizer_state(opt, named, i, r.template),
                          "state": {**r.state, "epoch_acc": epoch_acc[i].cpu().clone()},
                          "rng": ckpt.rng_states({"eps": r.eps_gen, "eval": r.eval_gen}),
                          "config": rundir.plain(r.cfg)}, r.run_dir / ckpt.CHECKPOINT)
        r.last_saved = r.state["global_step"]

    def check(values: List[List[float]], where: str) -> None:
        for i in alive():
            bad = [(name, v) for name, v in zip(_METRIC_NAMES, values[i]) if not math.isfinite(v)]
            if bad:
                runs[i].error = (f"{bad[0][0]} became {bad[0][1]} at {where}; stopped, and {runs[i].kept()}; "
                                 f"lower schedule.lr or check the data")

    state0 = runs[0].state
    n_epochs = len(lrs)
    bar = _progress(cfg0.progress, n_epochs * steps_per_epoch, state0["global_step"])
    t_start = time.perf_counter() - state0["wall_time"]
    acc = torch.zeros(n_models, 4, device=device, dtype=torch.float64)
    acc_n = 0
    epoch_acc = torch.zeros(n_models, 4, device=device, dtype=torch.float64)
    if state0["step"] > 0 and all(r.saved_epoch_acc is not None for r in runs):
        epoch_acc.copy_(torch.stack([r.saved_epoch_acc for r in runs]))
    position = {"epoch": state0["epoch"], "step": state0["step"], "global_step": state0["global_step"]}
    stop = GracefulStop()
    try:
        while position["epoch"] < n_epochs and not stop.requested and alive():
            epoch = position["epoch"]
            fast.set_lr(opt, lrs[epoch])
            xs, perms = [], []
            for seed in unique_seeds:  # each run's epoch data, exactly as its lone run draws it
                data_gen = torch.Generator(device=device).manual_seed(epoch_seed(seed, epoch))
                xs.append(binarize(data.train, data_gen) if data.binary else data.train)
                perms.append(torch.randperm(n_train, generator=data_gen, device=device))
            x_epoch = torch.stack(xs)                    # [U, n_train, x_dim]
            perm = torch.stack(perms).index_select(0, seed_row)  # [N, n_train]
            del xs, perms
            if position["step"] == 0:
                epoch_acc.zero_()
            t_epoch = time.perf_counter()
            for step in range(position["step"], steps_per_epoch):
                if _INTERRUPT_AT is not None and position["global_step"] == _INTERRUPT_AT:
                    stop.requested = True
                if stop.requested or not alive():
                    break
                xb = x_epoch[model_rows, perm[:, step * batch:(step + 1) * batch]]  # [N, B, x_dim]
                out = step_fn(xb)
                acc += out
                epoch_acc += out
                acc_n += 1
                position["step"] = step + 1
                position["global_step"] += 1
                if bar is not None:
                    bar.update(1)
                if acc_n == cfg0.log_every:
                    means = (acc / acc_n).tolist()  # the one host sync per log_every steps
                    check(means, f"epoch {epoch + 1}, step {step + 1}")
                    for i in alive():
                        _log_train(runs[i].log, means[i], lrs[epoch], position["global_step"], runs[i].obj.split)
                    if bar is not None and alive():
                        bar.set_postfix(bound=f"{means[alive()[0]][0]:.2f}", refresh=False)
                    acc.zero_()
                    acc_n = 0
            for i in alive():
                runs[i].state.update(position)
            if stop.requested or not alive():
                break
            check((epoch_acc / steps_per_epoch).tolist(), f"the end of epoch {epoch + 1}")
            finite = torch.stack([torch.isfinite(p).reshape(n_models, -1).all(1) for p in params]).all(0).tolist()
            for i in alive():
                if not finite[i]:
                    runs[i].error = (f"parameters became non-finite in epoch {epoch + 1}; stopped, and "
                                     f"{runs[i].kept()}; lower schedule.lr")
            stack.copy_to([r.model for r in runs])
            epoch_time = time.perf_counter() - t_epoch
            train_bounds = (epoch_acc[:, 0] / steps_per_epoch).tolist()
            for i in alive():
                r = runs[i]
                vb = valid_bound(r.model, r.obj, data.valid, r.cfg.m, r.cfg.k, r.eval_gen)
                r.state["history"].append({"epoch": epoch + 1, "train_bound": train_bounds[i], "valid_bound": vb,
                                           "lr": lrs[epoch]})
                r.log.scalars({"epoch/train_bound": train_bounds[i], "epoch/valid_bound": vb,
                               "epoch/steps_per_s": steps_per_epoch / max(epoch_time, 1e-9),
                               "epoch/lr": lrs[epoch]}, position["global_step"])
                if data.image_shape is not None:
                    _log_pictures(r.log, r.model, data, position["global_step"], r.eval_gen)
            position["epoch"], position["step"] = epoch + 1, 0
            wall = time.perf_counter() - t_start
            for i in alive():
                r = runs[i]
                r.state.update(position)
                r.state["wall_time"] = wall
                if r.cfg.eval.every and (epoch + 1) % r.cfg.eval.every == 0 and epoch + 1 < n_epochs:
                    result = ev.evaluate(r.model, data.test, r.cfg.eval, device)
                    _log_eval(r.log, result["metrics"], position["global_step"])
                save(i, epoch_acc)
            if bar is not None:
                bar.set_description(f"epoch {epoch + 1}/{n_epochs}", refresh=False)
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - t_start
    for i in alive():
        runs[i].state["wall_time"] = wall
    if stop.requested:
        stack.copy_to([r.model for r in runs])
        finite = torch.stack([torch.isfinite(p).reshape(n_models, -1).all(1) for p in params]).all(0).tolist()
        for i in alive():
            if finite[i]:
                save(i, epoch_acc)
        for r in runs:
            r.log.close()
        dirs = ", ".join(str(r.run_dir) for r in runs)
        raise Interrupted(runs[0].run_dir, runs[0].state,
                          f"interrupted at epoch {position['epoch'] + 1}, step {position['step']}; the checkpoints of "
                          f"the {n_models} stacked runs are saved ({dirs}). Run the same sweep again (same sweep=<name>) "
                          f"to continue them stacked, or resume=<dir> to continue one alone")

    names = [r.run_dir.name for r in runs]
    results: List[Any] = []
    for i, r in enumerate(runs):
        if r.error is not None:
            r.log.close()
            results.append(NonFiniteBound(r.error))
            continue
        print(f"vaexp: training done ({n_epochs} epochs, {r.state['global_step']} steps, {wall:.0f} s, "
              f"{n_models} runs stacked); evaluating {r.run_dir} on the test set (K={r.cfg.eval.k})", flush=True)
        try:
            result = ev.evaluate(r.model, data.test, r.cfg.eval, device, progress=r.cfg.progress)
        except KeyboardInterrupt:
            for other in runs[i:]:
                other.log.close()
            raise Interrupted(r.run_dir, r.state, f"interrupted during the final evaluation of {r.run_dir}; training "
                                                  f"of the stacked runs is complete and checkpointed: `vaexp eval <dir>` "
                                                  f"evaluates each, and running the sweep again finishes them")
        metrics = result["metrics"]
        _log_eval(r.log, metrics, r.state["global_step"])
        history = r.state["history"]
        summary = {
            "train": {"bound": history[-1]["train_bound"] if history else float("nan"),
                      "valid_bound": history[-1]["valid_bound"] if history else float("nan"),
                      "epochs": n_epochs, "steps": r.state["global_step"], "wall_time_s": r.state["wall_time"],
                      "device": str(device), "data_source": data.source,
                      "stacked_with": [name for j, name in enumerate(names) if j != i]},
            "test": metrics,
        }
        rundir.write_metrics(r.run_dir, summary, result["per_example"])
        r.log.hparams(rundir.hparams(r.cfg), {"hparam/test_nll": metrics["nll"],
                                              "hparam/train_bound": summary["train"]["bound"],
                                              **{f"hparam/active_units_{j + 1}": a
                                                 for j, a in enumerate(metrics["active_units"])}})
        r.log.close()
        results.append(summary)
    return results


# ============================================================================ stacks inside a sweep

@dataclass
class _Job:
    cfg: Any             # the job's task config (k derived from mk)
    run_dir: Path
    overrides: List[str]


@dataclass
class _Stack:
    jobs: List[_Job]
    attempted: bool = False
    results: Dict[str, Any] = field(default_factory=dict)  # run dir -> summary or error


# Filled by plan_sweep (the multirun start callback), read by the jobs of the same process.
_PLAN: Dict[str, _Stack] = {}


def _dir_key(path) -> str:
    return os.path.abspath(str(path))


def plan_sweep(jobs: Sequence, job_dirs: Sequence[Path]) -> Dict[str, _Stack]:
    """Group the sweep's stack=true jobs into stacks (same stack_key and the same checkpoint
    position); finished runs are left out. `jobs`: (overrides, composed config with hydra)."""
    from omegaconf import OmegaConf

    from vaexp import checkpoint as ckpt
    from vaexp import rundir
    from vaexp.sweep import apply_mk

    _PLAN.clear()
    groups: Dict[tuple, List[_Job]] = {}
    for (overrides, job_cfg), job_dir in zip(jobs, job_dirs):
        if not job_cfg.get("stack"):
            continue
        task = OmegaConf.masked_copy(job_cfg, [key for key in job_cfg.keys() if key != "hydra"])
        task = apply_mk(task)
        key = stack_key(task)
        if key is None:
            continue
        done = rundir.finished(job_dir)
        if done is not None and "test" in done and not rundir.more_epochs(task, job_dir):
            continue
        saved = ckpt.load(job_dir)
        at = (saved["state"]["epoch"], saved["state"]["step"]) if saved is not None else (0, 0)
        groups.setdefault((key, at), []).append(_Job(task, Path(job_dir), list(overrides)))
    for jobs_of_group in groups.values():
        if len(jobs_of_group) < 2:
            continue
        group = _Stack(jobs_of_group)
        for job in jobs_of_group:
            _PLAN[_dir_key(job.run_dir)] = group
    return _PLAN


def sweep_job(run_dir: Path, say: Callable[[str], None]) -> Optional[Dict]:
    """In a `-m stack=true` sweep: this job's result when it belongs to a stack (training the
    stack first when this is its first job to run), or None: train it alone as usual."""
    from vaexp import rundir
    from vaexp.config import TrainConfig
    from vaexp.evaluate import format_table
    from vaexp.sweep import in_multirun

    if not in_multirun():
        return None  # a single run (or a resumed one) trains alone; stack=true only groups a sweep's jobs
    group = _PLAN.get(_dir_key(run_dir))
    if group is None:
        return None
    me = _dir_key(run_dir)
    if not group.attempted:
        group.attempted = True
        ready: List[_Job] = []
        for job in group.jobs:
            try:
                job.cfg = rundir.prepare(job.cfg, job.run_dir, job.overrides, TrainConfig)
                ready.append(job)
            except VaexpError as err:
                group.results[_dir_key(job.run_dir)] = err
        if len(ready) > 1:
            say(f"vaexp: training {len(ready)} runs as one stacked model:\n" +
                "\n".join(f"  {job.run_dir}" for job in ready))
            results = train_stacked([job.cfg for job in ready], [job.run_dir for job in ready])
            for job, result in zip(ready, results):
                group.results[_dir_key(job.run_dir)] = result
    if me not in group.results:
        return None  # the stack did not run (a single compatible job left, or it failed): train alone
    result = group.results[me]
    if isinstance(result, BaseException):
        raise result
    leader = _dir_key(group.jobs[0].run_dir)
    if me == leader:
        say(f"vaexp: {run_dir}: final train bound {result['train']['bound']:.3f} (trained stacked)\n"
            f"{format_table(result['test'])}\n  metrics: {Path(run_dir) / rundir.METRICS}")
    else:
        say(f"vaexp: {run_dir} was trained in a stack with {Path(leader).name}; its results:\n"
            f"{format_table(result['test'])}")
    return result
