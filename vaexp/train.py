"""The trainer: one loop, top to bottom.

Data sits on the device. Each epoch draws a fresh Bernoulli binarisation and a permutation from
a generator seeded by (seed, epoch), so any epoch can be rebuilt exactly on resume; ε comes from
its own generator whose state is checkpointed. Metrics stay on the device and are read (one
host sync) every `log_every` steps and at the end of each epoch.
"""
from __future__ import annotations

import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import Tensor

from vaexp import checkpoint as ckpt
from vaexp import evaluate as ev
from vaexp import fast
from vaexp import rundir
from vaexp.data import Dataset, binarize, load_dataset
from vaexp.errors import VaexpError
from vaexp.estimators import Estimator, get_estimator, gradients, surrogate_losses
from vaexp.models import VAE, build_model
from vaexp.objectives import Objective, make_objective
from vaexp.schedule import epoch_learning_rates


class NonFiniteBound(VaexpError):
    pass


def resolve_device(name) -> torch.device:
    name = getattr(name, "value", name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2 ** 63)


def build(cfg, data: Dataset, device: torch.device):
    torch.manual_seed(cfg.seed)  # parameter init
    model = build_model(cfg.model, data).to(device)
    return model, adam(model.parameters(), cfg.schedule, device)


def adam(params, sch, device: torch.device) -> torch.optim.Adam:
    """Adam with the schedule's settings. On a CPU the fused kernel (one pass per parameter
    instead of ~10; about 4x faster for Burda's models on 2 cores, same update up to float
    rounding); on CUDA the default, which vaexp.fast makes capturable for the captured step."""
    fused = True if device.type == "cpu" else None
    return torch.optim.Adam(params, lr=sch.lr, betas=(sch.beta1, sch.beta2), eps=sch.eps, fused=fused)


def train_step(model: VAE, obj: Objective, est: Estimator, opt: torch.optim.Optimizer,
               theta: List[Tensor], phi: List[Tensor], x: Tensor, m: int, k: int,
               gen: torch.Generator) -> Tensor:
    """One Adam step; returns [θ bound, φ bound, |∇θ|, |∇φ|] (batch means) on the device."""
    lws = model.log_weights(x, m, k, need_bar=est.needs_lw_bar, generator=gen)
    losses = surrogate_losses(obj, est, lws.lw, lws.lw_bar)
    g_theta, g_phi = gradients(losses, theta, phi)
    for p, g in zip(theta + phi, g_theta + g_phi):
        p.grad = g
    opt.step()
    norm = lambda gs: torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gs]))
    return torch.stack([losses.bound.mean(), losses.phi_bound.mean(), norm(g_theta), norm(g_phi)])


@torch.no_grad()
def valid_bound(model: VAE, obj: Objective, x: Tensor, m: int, k: int, gen: torch.Generator,
                batch: int = 100) -> float:
    if x.shape[0] == 0:
        return float("nan")
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], batch):
        total += obj.theta(model.log_weights(x[start:start + batch], m, k, generator=gen).lw).double().sum()
    return float(total / x.shape[0])


def train(cfg, run_dir: Path) -> Dict:
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.dataset, device)
    model, opt = build(cfg, data, device)
    obj, est = make_objective(cfg.objective.name, cfg.beta), get_estimator(cfg.estimator.name)
    theta, phi = model.theta_parameters(), model.phi_parameters()
    lrs = epoch_learning_rates(cfg.schedule)
    n_train, B = data.train.shape[0], cfg.batch_size
    steps_per_epoch = n_train // B  # fixed batch shape; the remainder changes with every permutation
    if steps_per_epoch < 1:
        raise VaexpError(f"batch_size={B}: larger than the {n_train} training images; lower batch_size")
    eps_gen = torch.Generator(device=device).manual_seed(cfg.seed)
    eval_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)

    # Resume where the last checkpoint stopped (same run directory), or start fresh.
    state = {"epoch": 0, "step": 0, "global_step": 0, "wall_time": 0.0, "history": []}
    saved = ckpt.load(run_dir, map_location=device)
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        ckpt.restore_rng_states(saved["rng"], {"eps": eps_gen, "eval": eval_gen})
        state = saved["state"]
        saved_epoch_acc = state.pop("epoch_acc", None)  # the bound sums of a part-done epoch
        print(f"vaexp: resuming {run_dir} at epoch {state['epoch'] + 1}, step {state['step']}")
    log = rundir.logger(run_dir, purge_step=state["global_step"] if saved else None)
    if saved is None:
        log.scalars({"params/theta": sum(p.numel() for p in theta), "params/phi": sum(p.numel() for p in phi)}, 0)

    # Global step of the checkpoint on disk (None: none written yet), for the messages below.
    last_saved = state["global_step"] if saved is not None else None

    def save_checkpoint() -> None:
        nonlocal last_saved
        ckpt.atomic_save({"model": model.state_dict(), "optimizer": fast.portable_state_dict(opt),
                          "state": {**state, "epoch_acc": epoch_acc.cpu().clone()},
                          "rng": ckpt.rng_states({"eps": eps_gen, "eval": eval_gen}),
                          "config": rundir.plain(cfg)}, run_dir / ckpt.CHECKPOINT)
        last_saved = state["global_step"]

    def kept() -> str:
        if last_saved is None:
            return f"no checkpoint had been written yet, so {run_dir} holds none"
        return f"the last good checkpoint (after {last_saved} steps) is kept in {run_dir}"

    def check_finite(values: Tensor, where: str) -> None:
        if not bool(torch.isfinite(values).all()):
            names = ("training bound", "phi bound", "theta gradient norm", "phi gradient norm")
            name, value = next((n, v) for n, v in zip(names, values.tolist()) if not math.isfinite(v))
            raise NonFiniteBound(f"{name} became {value} at {where}; stopped, and {kept()}; "
                                 f"lower schedule.lr or check the data")

    def eager_step(xb: Tensor) -> Tensor:
        return train_step(model, obj, est, opt, theta, phi, xb, cfg.m, cfg.k, eps_gen)

    # On CUDA (fast=auto|true) the whole step runs as one captured CUDA graph (vaexp.fast).
    step_fn = fast.captured_step(cfg.fast, device, opt, theta + phi, [eps_gen], eager_step) or eager_step

    n_epochs = len(lrs)
    bar = _progress(cfg.progress, n_epochs * steps_per_epoch, state["global_step"])
    t_start = time.perf_counter() - state["wall_time"]
    acc = torch.zeros(4, device=device, dtype=torch.float64)
    acc_n = 0
    epoch_acc = torch.zeros(4, device=device, dtype=torch.float64)
    if saved is not None and state["step"] > 0 and saved_epoch_acc is not None:
        epoch_acc.copy_(saved_epoch_acc)  # resumed mid-epoch: the epoch's mean covers all its steps
    stop = GracefulStop()
    try:
        while state["epoch"] < n_epochs and not stop.requested:
            epoch = state["epoch"]
            fast.set_lr(opt, lrs[epoch])  # in place when lr is the captured step's device tensor
            data_gen = torch.Generator(device=device).manual_seed(epoch_seed(cfg.seed, epoch))
            x_epoch = binarize(data.train, data_gen) if data.binary else data.train
            perm = torch.randperm(n_train, generator=data_gen, device=device)
            if state["step"] == 0:
                epoch_acc.zero_()
            t_epoch = time.perf_counter()
            for step in range(state["step"], steps_per_epoch):
                if _INTERRUPT_AT is not None and state["global_step"] == _INTERRUPT_AT:
                    stop.requested = True  # test hook: a deterministic Ctrl-C
                if stop.requested:
                    break
                xb = x_epoch[perm[step * B:(step + 1) * B]]
                out = step_fn(xb)
                acc += out
                epoch_acc += out
                acc_n += 1
                state["step"] = step + 1
                state["global_step"] += 1
                if bar is not None:
                    bar.update(1)
                if acc_n == cfg.log_every:
                    means = (acc / acc_n).tolist()  # the one host sync per log_every steps
                    check_finite(acc, f"epoch {epoch + 1}, step {step + 1}")
                    _log_train(log, means, lrs[epoch], state["global_step"], obj.split)
                    if bar is not None:
                        bar.set_postfix(bound=f"{means[0]:.2f}", refresh=False)
                    acc.zero_()
                    acc_n = 0
            if stop.requested:
                break
            # End of epoch: check before anything is written, then checkpoint.
            n_steps = steps_per_epoch
            check_finite(epoch_acc, f"the end of epoch {epoch + 1}")
            if not params_finite(model):
                raise NonFiniteBound(f"parameters became non-finite in epoch {epoch + 1}; stopped, and {kept()}; "
                                     f"lower schedule.lr")
            train_bound = float(epoch_acc[0] / n_steps)
            vb = valid_bound(model, obj, data.valid, cfg.m, cfg.k, eval_gen)
            epoch_time = time.perf_counter() - t_epoch
            state["history"].append({"epoch": epoch + 1, "train_bound": train_bound, "valid_bound": vb,
                                     "lr": lrs[epoch]})
            log.scalars({"epoch/train_bound": train_bound, "epoch/valid_bound": vb,
                         "epoch/steps_per_s": n_steps / max(epoch_time, 1e-9), "epoch/lr": lrs[epoch]},
                        state["global_step"])
            if data.image_shape is not None:
                _log_pictures(log, model, data, state["global_step"], eval_gen)
            state["epoch"], state["step"] = epoch + 1, 0
            state["wall_time"] = time.perf_counter() - t_start
            if bar is not None:
                bar.set_description(f"epoch {epoch + 1}/{n_epochs}", refresh=False)
            if cfg.eval.every and (epoch + 1) % cfg.eval.every == 0 and epoch + 1 < n_epochs:
                result = ev.evaluate(model, data.test, cfg.eval, device)
                _log_eval(log, result["metrics"], state["global_step"])
            save_checkpoint()
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
    state["wall_time"] = time.perf_counter() - t_start
    if stop.requested:
        # Keep the work since the last checkpoint (mid-epoch too), unless it is not finite.
        if params_finite(model):
            save_checkpoint()
        log.close()
        raise Interrupted(run_dir, state)

    train_bound = state["history"][-1]["train_bound"] if state["history"] else float("nan")
    print(f"vaexp: training done ({n_epochs} epochs, {state['global_step']} steps, "
          f"{state['wall_time']:.0f} s); evaluating on the test set (K={cfg.eval.k})")
    try:
        result = ev.evaluate(model, data.test, cfg.eval, device, progress=cfg.progress)
    except KeyboardInterrupt:
        log.close()
        raise Interrupted(run_dir, state, f"interrupted during the final evaluation; training is complete and "
                                          f"checkpointed in {run_dir}: `vaexp eval {run_dir}` evaluates it "
                                          f"(re-running with resume={run_dir} does too, and writes metrics.json)")
    metrics = result["metrics"]
    _log_eval(log, metrics, state["global_step"])
    summary = {
        "train": {"bound": train_bound,
                  "valid_bound": state["history"][-1]["valid_bound"] if state["history"] else float("nan"),
                  "epochs": n_epochs, "steps": state["global_step"], "wall_time_s": state["wall_time"],
                  "device": str(device), "data_source": data.source},
        "test": metrics,
    }
    rundir.write_metrics(run_dir, summary, result["per_example"])
    log.hparams(rundir.hparams(cfg), {"hparam/test_nll": metrics["nll"], "hparam/train_bound": train_bound,
                                      **{f"hparam/active_units_{i + 1}": a
                                         for i, a in enumerate(metrics["active_units"])}})
    log.close()
    return summary


class Interrupted(Exception):
    def __init__(self, run_dir: Path, state: Dict, message: Optional[str] = None):
        super().__init__(message or f"interrupted at epoch {state['epoch'] + 1}, step {state['step']}; "
                                    f"checkpoint saved in {run_dir}. Re-run with resume={run_dir} to continue")
        self.run_dir, self.state = run_dir, state


# Test hook: raise KeyboardInterrupt before this global step (a deterministic stand-in for Ctrl-C).
_INTERRUPT_AT: Optional[int] = int(os.environ["VAEXP_INTERRUPT_AT_STEP"]) if os.environ.get("VAEXP_INTERRUPT_AT_STEP") else None


def params_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


class GracefulStop:
    """SIGINT/SIGTERM ask the loop to stop after the current step (so the checkpoint is
    consistent); a second signal stops at once."""

    def __init__(self):
        self.requested = False
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc="train")


def _log_train(log, means: List[float], lr: float, step: int, split: bool) -> None:
    values = {"train/bound": means[0], "train/lr": lr, "train/grad_norm_theta": means[2],
              "train/grad_norm_phi": means[3]}
    if split:
        values["train/phi_bound"] = means[1]
    log.scalars(values, step)


def _log_eval(log, metrics: Dict, step: int) -> None:
    values = {"eval/nll": metrics["nll"]}
    for key, value in metrics.items():
        if key.startswith("L") and key[1:].isdigit():
            values[f"eval/{key}"] = value
    for i, a in enumerate(metrics["active_units"]):
        values[f"eval/active_units_{i + 1}"] = a
    for key in ("recon", "avg_kl", "mutual_info", "marginal_kl"):  # ELBO surgery, when computed
        if key in metrics:
            values[f"eval/{key}"] = metrics[key]
    log.scalars(values, step)


def _log_pictures(log, model: VAE, data: Dataset, step: int, gen: torch.Generator) -> None:
    model.eval()
    log.images("samples", model.sample(64, generator=gen), data.image_shape, step)
    x = data.test[:32]
    pairs = torch.stack([x, model.reconstruct(x)], 1).reshape(2 * x.shape[0], -1)  # original, reconstruction
    log.images("reconstructions", pairs, data.image_shape, step, cols=8)
    model.train()
