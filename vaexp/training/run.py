"""One run's state: its directory, model, generators, position, logger, and its checkpoint.

``state`` (saved in the checkpoint) is the run's position: ``epoch`` (epochs completed),
``step`` (steps done in the current epoch; 0 between epochs), ``global_step``, ``wall_time``
(training seconds so far), ``history`` (per epoch: train bound, valid bound, lr), and what
besides the config decides its last bits: ``kernels``, ``stacked_with`` and the changes a resume
made to them (``kernel_changes``, ``stack_changes``). A
checkpoint also holds ``epoch_acc``: the float64 sums of the step metrics over the steps done in
a part-done epoch, so a resumed epoch's mean covers all its steps, and ``log_acc`` / ``log_n``,
those since the last TensorBoard point, so a resumed run logs the same points at the same steps.
Invariants: a run's model is initialised by ``torch.manual_seed(seed)`` then the model (alone or
stacked, the same values); its ε come from ``eps`` and its validation/picture draws from
``eval``, generators seeded by its seed and restored from the checkpoint, so a resumed run
continues bit for bit (on another kind of device: a new stream, with a warning).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from vaexp import rundir, runtime
from vaexp.data import Dataset
from vaexp.errors import VaexpError
from vaexp.models import activation, build_model, dense
from vaexp.evaluate import format_table
from vaexp.objectives import Objective, make_objective
from vaexp.training.step import compiled_form as compiled_step_form
from vaexp import tblog
from vaexp.tblog import RunLogger, eval_card, hparam_metrics


class NonFiniteBound(VaexpError):
    pass


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch `epoch`'s binarisation and permutation: any epoch can be rebuilt."""
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2 ** 63)


def rng_states(generators: Dict[str, torch.Generator]) -> Dict[str, Any]:
    states = {name: g.get_state() for name, g in generators.items()}
    states["torch_cpu"] = torch.get_rng_state()
    if any(g.device.type == "cuda" for g in generators.values()):  # a CPU run never initialises CUDA
        states["torch_cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Dict[str, Any], generators: Dict[str, torch.Generator]) -> List[str]:
    """Put the saved states back; the names of the generators that could not take theirs, being of
    another device than the one they were saved from (a CPU generator's state is 5056 bytes, a
    CUDA one's 16). States are CPU byte tensors, whatever map_location moved them to: set_state
    takes nothing else."""
    other_device = []
    for name, g in generators.items():
        state = states[name].cpu()
        if state.numel() != g.get_state().numel():
            other_device.append(name)
            continue
        g.set_state(state)
    torch.set_rng_state(states["torch_cpu"].cpu())
    cuda = [s.cpu() for s in states.get("torch_cuda") or []]
    on_cuda = any(g.device.type == "cuda" for g in generators.values())
    if cuda and on_cuda and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return other_device


def reseed_on_new_device(seed: int, global_step: int, name: str) -> int:
    """The seed of a generator whose saved state is of another device: a fresh stream from the run's
    seed and step (never the start of its first one again)."""
    return (seed * 1_000_003 + global_step * 104_729 + (7 if name == "eps" else 13)) % (2 ** 63)


@dataclass
class Run:
    cfg: Any
    dir: Path
    model: nn.Module
    objective: Objective
    eps_gen: torch.Generator
    eval_gen: torch.Generator
    log: RunLogger
    state: Dict = field(default_factory=dict)
    saved_optimizer: Optional[Dict] = None     # the checkpoint's Adam state, for the step to load
    saved_epoch_acc: Optional[Tensor] = None   # the checkpoint's part-done epoch sums [4]
    saved_log: Optional[Tuple[Tensor, int]] = None  # its sums [4] and count since the last TensorBoard point
    last_saved: Optional[int] = None           # global step of the checkpoint on disk (None: none yet)
    saved_state: Optional[Dict] = None         # that checkpoint's position (epoch, step, global_step)
    error: Optional[str] = None                # why this run stopped early (a non-finite bound)

    @property
    def resumed(self) -> bool:
        return self.saved_optimizer is not None

    def checkpoint_status(self) -> str:
        if self.last_saved is None:
            return "no checkpoint had been written yet"
        return f"the last good checkpoint (after {self.last_saved} steps) is kept in {self.dir}"

    def save(self, optimizer_state: Dict, epoch_acc: Tensor, log_acc: Tensor, log_n: int) -> None:
        rundir.atomic_save({"model": self.model.state_dict(), "optimizer": optimizer_state,
                            "state": {**self.state, "epoch_acc": epoch_acc.cpu().clone(),
                                      "log_acc": log_acc.cpu().clone(), "log_n": int(log_n)},
                            "rng": rng_states({"eps": self.eps_gen, "eval": self.eval_gen}),
                            "config": rundir.as_dict(self.cfg)}, self.dir / rundir.CHECKPOINT)
        self.last_saved = self.state["global_step"]
        self.saved_state = {key: self.state[key] for key in ("epoch", "step", "global_step")}

    # -- TensorBoard ---------------------------------------------------------------------------
    def log_train(self, means: List[float], lr: float, step: int) -> None:
        slug = self.objective.slug  # "bound", or jvi's "jvi_estimate": never call that a bound
        values = {f"train/{slug}": means[0], "train/lr": lr, "train/grad_norm_theta": means[2],
                  "train/grad_norm_phi": means[3]}
        if self.objective.split:
            values[f"train/phi_{slug}"] = means[1]
        self.log.scalars(values, step)

    def log_eval(self, metrics: Dict, step: int, final: bool = False) -> None:
        """eval/* scalars, and the evaluation as a TEXT card (eval/summary): a single point in a
        line chart is hard to read, the card states every number."""
        what = "the final evaluation" if final else "an evaluation during training"
        self.log.text("eval/summary", eval_card(f"{what}: epoch {self.state['epoch']}, step {step}",
                                                format_table(metrics)), step)
        values = {"eval/nll": metrics["nll"]}
        for key in rundir.lk_keys(metrics):
            values[f"eval/{key}"] = metrics[key]
        for i, a in enumerate(metrics["active_units"]):
            values[f"eval/active_units_{i + 1}"] = a
        for key in ("recon", "avg_kl", "mutual_info", "marginal_kl") + rundir.WEIGHT_KEYS:  # ELBO surgery, when computed
            if key in metrics:
                values[f"eval/{key}"] = metrics[key]
        self.log.scalars(values, step)

    def log_pictures(self, data: Dataset, step: int) -> None:
        model = self.model
        model.eval()
        self.log.images("samples", model.sample(64, generator=self.eval_gen), data.image_shape, step)
        x = data.test[:32]
        pairs = torch.stack([x, model.reconstruct(x)], 1).reshape(2 * x.shape[0], -1)  # original, reconstruction
        self.log.images("reconstructions", pairs, data.image_shape, step, cols=8)
        model.train()

    def log_hparams(self, summary: Dict) -> None:
        """The run's row of the HPARAMS table: its settings (the keys its sweep varies, or its
        command line set, flagged) and the final evaluation's metrics (a later `vaexp eval`
        writes them again)."""
        values, differs = tblog.hparams(self.cfg, tblog.varied_keys(self.dir))
        self.log.hparams(values, differs, hparam_metrics(summary["test"], summary["train"]), self.state["global_step"])

    def train_summary(self, device: torch.device, data: Dataset) -> Dict:
        """metrics.json's "train": the training as it happened (epochs and steps done)."""
        # train.bound, or train.jvi_estimate for jvi (not a bound)
        train = {**rundir.last_trained(self.state["history"], self.objective.quantity),
                 "epochs": self.state["epoch"], "steps": self.state["global_step"],
                 "wall_time_s": self.state["wall_time"], "device": str(device), "data_source": data.source,
                 "training_data": data.training_digest(),
                 **kernels(device)}  # GEMM kernel, subnormals flushed, compiled paths allowed
        if self.state.get("kernel_changes"):
            train["kernel_changes"] = self.state["kernel_changes"]  # resumed under other kernels (_note_kernel_change)
        if self.state.get("fast_fallbacks"):
            train["fast_fallbacks"] = self.state["fast_fallbacks"]  # the fast step dropped (note_fallback)
        if self.state.get("stacked_with"):
            train["stacked_with"] = self.state["stacked_with"]  # the stack of its latest training (note_stack)
        if self.state.get("stack_changes"):
            train["stack_changes"] = self.state["stack_changes"]  # resumed in another stack (note_stack)
        return train


def kernels(device: torch.device) -> Dict[str, Any]:
    """What, besides the config, decides a run's last bits on this machine (recorded with every
    checkpoint: a resume under other kernels continues correctly, but not bit for bit)."""
    return {"gemm": dense.kernel_name(device), "flush_denormal": runtime.denormals_flushed(),
            "compile": runtime.compiling(),
            # the tanh of compiled CPU graphs (vaexp.models.activation); torch's before 2026-12-03
            "tanh": activation.compiled_form(device, runtime.compiling()),
            # the compiled CPU step's form (vaexp.training.step.compiled_form); "autograd" before 2026-12-03
            "compiled_step": compiled_step_form(device, runtime.compiling()),
            # MKL's reproducibility mode (vaexp.runtime.ask_strict_gemm); not recorded before 2026-12
            "mkl_cbwr": os.environ.get(runtime.MKL_CBWR_ENV) if device.type == "cpu" else None}


def _note_kernel_change(run: Run, device: torch.device) -> None:
    """Warn when a resumed run's checkpoint was written under other kernels than this process
    uses (e.g. another vaexp version's GEMM rule, VAEXP_GEMM, VAEXP_FLUSH_DENORMAL or VAEXP_COMPILE
    changed), and keep the change in the run's state for metrics.json's train.kernel_changes.
    A checkpoint from before kernels were recorded says nothing, and gets no warning."""
    before, now = run.state.get("kernels"), kernels(device)
    if before and "tanh" not in before:  # written before the record had it: compiled graphs used torch.tanh
        before = {**before, "tanh": "torch"}
    if before and "compiled_step" not in before:  # likewise: the step compiled before Adam joined its graph
        before = {**before, "compiled_step": "autograd" if before.get("compile") and device.type == "cpu" else None}
    if not before or before == now:
        return
    changed = {key: [before.get(key), value] for key, value in now.items() if before.get(key) != value}
    step = run.state["global_step"]
    run.state.setdefault("kernel_changes", []).append({"step": step, **changed})
    what = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items())
    warnings.warn(f"vaexp: {run.dir / rundir.CHECKPOINT} was written with other kernels than this process uses "
                  f"({what}): the resumed run continues correctly, but from step {step} not bit for bit as it "
                  f"would have (metrics.json records the change as train.kernel_changes)", RuntimeWarning,
                  stacklevel=3)


def note_fallback(runs: List[Run], step: int, reason: Optional[str]) -> None:
    """Keep in each run's state that from `step` on this process trained with the eager step, its
    fast form (compiled or captured) dropped for `reason`, for metrics.json's train.fast_fallbacks:
    the kernels record says which forms were allowed, and the eager step rounds differently."""
    for run in runs:
        run.state.setdefault("fast_fallbacks", []).append({"step": step, "reason": reason})


def note_stack(run: Run, others: List[str]) -> None:
    """Keep in the run's state the runs it trains stacked with from now on (the job directories'
    names; [] alone), and when a resume changes them, the change for metrics.json's
    train.stack_changes: train.stacked_with names the latest stack only, and a stack rounds
    differently from a lone run, so an earlier one must stay on record. A checkpoint from
    before stacks were recorded says nothing of its stack."""
    before = run.state.get("stacked_with")
    if run.resumed and before is not None and sorted(before) != sorted(others):
        run.state.setdefault("stack_changes", []).append(
            {"step": run.state["global_step"], "stacked_with": [list(before), list(others)]})
    run.state["stacked_with"] = list(others)


def open_run(cfg: Any, run_dir: Path, data: Dataset, device: torch.device) -> Run:
    """The run in `run_dir`: a fresh model, or the checkpoint's (VaexpError when the checkpoint is
    damaged or belongs to another run). Writes nothing but its TensorBoard file."""
    run_dir = Path(run_dir)
    torch.manual_seed(cfg.seed)  # parameter init
    model = build_model(cfg.model, data).to(device)
    run = Run(cfg=cfg, dir=run_dir, model=model, objective=make_objective(cfg.objective.name, cfg.beta),
              eps_gen=torch.Generator(device=device).manual_seed(cfg.seed),
              eval_gen=torch.Generator(device=device).manual_seed(cfg.seed + 1), log=None,
              state={"epoch": 0, "step": 0, "global_step": 0, "wall_time": 0.0, "history": []})
    # On the CPU: load_state_dict moves the model's and Adam's tensors to the parameters' device,
    # except Adam's step counts, which an eager Adam on CUDA must keep on the host (on the GPU
    # every step would read each back: a sync per parameter and step).
    saved = rundir.load_checkpoint(run_dir, map_location="cpu")
    if saved is not None:
        rundir.check_checkpoint(saved, cfg, run_dir)
        rundir.restore_model(model, saved, run_dir)
        run.saved_optimizer = saved["optimizer"]
        gens = {"eps": run.eps_gen, "eval": run.eval_gen}
        moved = restore_rng_states(saved["rng"], gens)
        run.state = saved["state"]
        for name in moved:
            gens[name].manual_seed(reseed_on_new_device(cfg.seed, run.state["global_step"], name))
        if moved:
            warnings.warn(f"vaexp: {run_dir / rundir.CHECKPOINT} was written on another device (its random-number "
                          f"state is not {device.type}'s): the resumed run draws its noise from a new stream "
                          f"(from the seed and step), so it continues correctly but not bit for bit as it would "
                          f"have on the first device", RuntimeWarning, stacklevel=2)
        _note_kernel_change(run, device)
        run.saved_epoch_acc = run.state.pop("epoch_acc", None)
        log_acc, log_n = run.state.pop("log_acc", None), run.state.pop("log_n", 0)
        run.saved_log = None if log_acc is None else (log_acc, int(log_n))  # (None: an older checkpoint)
        run.last_saved = run.state["global_step"]
        run.saved_state = {key: run.state[key] for key in ("epoch", "step", "global_step")}
    run.state["kernels"] = kernels(device)
    run.log = RunLogger(run_dir, session=run.state["global_step"] + 1 if saved is not None else 0)
    if saved is None:
        run.log.scalars({"params/theta": sum(p.numel() for p in model.theta_parameters()),
                         "params/phi": sum(p.numel() for p in model.phi_parameters())}, 0)
    return run
