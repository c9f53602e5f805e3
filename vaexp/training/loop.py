"""THE training loop: ``fit(runs, ...)`` trains N >= 1 runs; a single run is a stack of one.

Data sit on the device. Each epoch draws every run's binarisation and permutation from a
generator seeded by (its seed, epoch), so any epoch can be rebuilt on resume. The step metrics
(vaexp.training.step.METRICS, one row per run) are summed on the device and read - the only
host sync - every ``log_every`` steps and at the end of each epoch. A run whose metrics or
parameters turn non-finite stops (its last good checkpoint stays) and the others go on; SIGINT /
SIGTERM stop every run after the current step and checkpoint it (:class:`Stop`). The end of an
epoch checks, then validates, logs and checkpoints each run; the end of training records each
run's training in metrics.json, then evaluates it (so an interrupted evaluation loses nothing).
train / train_stacked hold each run directory's lock (vaexp.rundir.begin) and write config.yaml
only once the data and the checkpoints have been read; memory exhaustion becomes a VaexpError
naming the setting to lower.
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from vaexp import evaluate as ev
from vaexp import rundir, runtime
from vaexp.data import Dataset, binarize, load_dataset
from vaexp.errors import Interrupted, VaexpError, allocation_detail, is_out_of_memory, os_error_line
from vaexp.objectives import Objective
from vaexp.runtime import resolve_device
from vaexp.schedule import epoch_learning_rates
from vaexp.training import capture
from vaexp.training.diagnostics import loop_diagnostics
from vaexp.training.run import NonFiniteBound, Run, epoch_seed, note_fallback, note_stack, open_run
from vaexp.training.step import METRICS, make_step, spec_of, stack_key


class Stop:
    """When the loop stops early. SIGINT/SIGTERM (while installed) ask it to stop after the
    current step, so the checkpoint is consistent; a second signal stops at once.
    ``at_step``: stop before this global step, a deterministic stand-in for Ctrl-C (the CLI sets
    it from $VAEXP_INTERRUPT_AT_STEP; tests pass it directly)."""

    def __init__(self, at_step: Optional[int] = None):
        self.at_step, self.requested = at_step, False
        self._first: Optional[int] = None  # the step this process started at
        self._old: Dict = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def before(self, global_step: int) -> bool:
        """True when the loop must stop before running this global step (at_step: only after this
        process ran a step, so a resume from that very step goes on)."""
        if self._first is None:
            self._first = global_step
        if self.at_step is not None and global_step == self.at_step and global_step > self._first:
            self.requested = True
        return self.requested


class EpochData:
    """Every run's training data for one epoch: the binarisation and the permutation drawn from
    (its seed, epoch), exactly as the run draws them alone; runs with the same seed share them."""

    def __init__(self, data: Dataset, seeds: Sequence[int], epoch: int, device: torch.device):
        unique = list(dict.fromkeys(seeds))
        xs, perms = [], []
        for seed in unique:
            gen = torch.Generator(device=device).manual_seed(epoch_seed(seed, epoch))
            xs.append(binarize(data.train, gen) if data.binary else data.train)
            perms.append(torch.randperm(data.train.shape[0], generator=gen, device=device))
        rows = torch.tensor([unique.index(s) for s in seeds], device=device)
        self.x = xs[0].unsqueeze(0) if len(xs) == 1 else torch.stack(xs)  # [U, n_train, x_dim]
        self.perm = torch.stack(perms).index_select(0, rows)              # [N, n_train]
        self.rows = rows.unsqueeze(1)                                      # [N, 1]

    def batch(self, i: int, size: int) -> Tensor:
        """Batch i of every run: [N, size, x_dim]."""
        if self.perm.shape[0] == 1:  # a lone run: the plain gather (~half the cost of the two-index one)
            return self.x[0].index_select(0, self.perm[0, i * size:(i + 1) * size]).unsqueeze(0)
        return self.x[self.rows, self.perm[:, i * size:(i + 1) * size]]


@torch.no_grad()
def valid_bound(model, obj: Objective, x: Tensor, m: int, k: int, gen: torch.Generator, batch: int = 100) -> float:
    if x.shape[0] == 0:
        return float("nan")
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], batch):
        total += obj.theta(model.log_weights(x[start:start + batch], m, k, generator=gen).lw).double().sum()
    return float(total / x.shape[0])


def first_non_finite(values: Sequence[float], where: str, run: Run) -> Optional[str]:
    """The message for the first non-finite step metric of a run, or None."""
    for name, v in zip(METRICS, values):
        if not math.isfinite(v):
            name = name.replace("bound", run.objective.quantity)  # jvi's is the JVI estimate
            return f"{name} became {v} at {where}; stopped, and {run.checkpoint_status()}; lower schedule.lr or check the data"
    return None


def describe_position(state: Dict, n_epochs: int, steps_per_epoch: int) -> str:
    """How far a run's checkpoint is, in the user's terms (epochs counted from 1, as on the bar)."""
    done, step = state["epoch"], state["step"]
    if step >= steps_per_epoch:
        return f"{done} of {n_epochs} epochs done, and all {steps_per_epoch} steps of epoch {done + 1}"
    if step:
        return f"{done} of {n_epochs} epochs done, and {step} of the {steps_per_epoch} steps of epoch {done + 1}"
    return f"{done} of {n_epochs} epochs done"


def position_message(state: Dict, n_epochs: int, steps_per_epoch: int) -> str:
    """Where a resumed run stands and what happens next."""
    done, step = state["epoch"], state["step"]
    if done >= n_epochs:
        more = f"{done} epochs; the schedule asks for {n_epochs}" if done > n_epochs else f"{done}/{n_epochs} epochs"
        return f"training is complete ({more}); evaluating"
    where = describe_position(state, n_epochs, steps_per_epoch)
    if step >= steps_per_epoch:
        return f"{where}; finishing epoch {done + 1} (validation, checkpoint)"
    return f"{where}; {'continuing' if step else 'starting'} epoch {done + 1}"


def progress_label(epoch: int, n_epochs: int) -> str:
    """The progress bar's label while epoch `epoch` (0-based) trains: the epoch being trained."""
    return f"epoch {epoch + 1}/{n_epochs}"


def _progress(enabled: bool, total: int, initial: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)


def fit(runs: List[Run], data: Dataset, device: torch.device, stop: Optional[Stop] = None
        ) -> List[Union[Dict, NonFiniteBound]]:
    """Train `runs` (same stack key when N > 1, all at the same position) to the end of their
    schedule and evaluate them; per run its summary, or the NonFiniteBound that stopped it.
    Raises Interrupted when stopped (every run checkpointed)."""
    cfg0, n_runs = runs[0].cfg, len(runs)
    stop = stop or Stop()
    step = make_step([r.model for r in runs], [spec_of(r.cfg) for r in runs], [r.eps_gen for r in runs],
                     [r.saved_optimizer for r in runs], cfg0.schedule, device)
    diagnostics = loop_diagnostics(runs, data.valid, device)  # None unless diagnostics.every is set

    lrs = epoch_learning_rates(cfg0.schedule)
    n_epochs, n_train, batch = len(lrs), data.train.shape[0], cfg0.batch_size
    steps_per_epoch = n_train // batch  # fixed batch shape; the remainder changes with every permutation
    if steps_per_epoch < 1:
        raise VaexpError(f"batch_size={batch}: larger than the {n_train} training images; lower batch_size")
    for r in runs:
        if r.state["epoch"] < n_epochs:  # (a finished run resumed only to be evaluated trains in no stack)
            note_stack(r, [o.dir.name for o in runs if o is not r])
    # fast=auto: on CUDA the whole step as one captured CUDA graph, on a CPU (long runs) compiled.
    rows = n_epochs * steps_per_epoch * int(cfg0.m) * int(cfg0.k) * batch
    step_fn = capture.fast_step(cfg0.fast, device, step, rows) or step
    fell_back = False  # the fast form dropped for the eager step (a warning; recorded: note_fallback)

    position = {key: runs[0].state[key] for key in ("epoch", "step", "global_step")}
    if runs[0].resumed:
        where = position_message(runs[0].state, n_epochs, steps_per_epoch)
        print(f"vaexp: resuming {runs[0].dir if n_runs == 1 else f'{n_runs} stacked runs'}: {where}", flush=True)
    # Sums of the step metrics [N, 4] in float64: since the last log (acc) and over the epoch.
    acc = torch.zeros(n_runs, len(METRICS), device=device, dtype=torch.float64)
    acc_n = 0
    epoch_acc = torch.zeros_like(acc)
    if position["step"] > 0 and all(r.saved_epoch_acc is not None for r in runs):
        epoch_acc.copy_(torch.stack([r.saved_epoch_acc for r in runs]))  # resumed mid-epoch
    if all(r.saved_log is not None for r in runs) and len({r.saved_log[1] for r in runs}) == 1:
        acc.copy_(torch.stack([r.saved_log[0] for r in runs]))  # the points since the last TensorBoard point
        acc_n = runs[0].saved_log[1]

    def alive() -> List[int]:
        return [i for i, r in enumerate(runs) if r.error is None]

    def check(means: List[List[float]], where: str) -> None:
        for i in alive():
            runs[i].error = first_non_finite(means[i], where, runs[i])

    # No bar when no training step is left (only the evaluation): a full bar would say nothing.
    bar = _progress(cfg0.progress and position["epoch"] < n_epochs, n_epochs * steps_per_epoch,
                    position["global_step"], progress_label(position["epoch"], n_epochs))
    t_start = time.perf_counter() - runs[0].state["wall_time"]
    stop.install()
    try:
        while position["epoch"] < n_epochs and alive() and not stop.requested:
            epoch = position["epoch"]
            step.set_lr(lrs[epoch])
            if bar is not None:
                bar.set_description(progress_label(epoch, n_epochs), refresh=False)
            epoch_data = EpochData(data, [int(r.cfg.seed) for r in runs], epoch, device)
            if position["step"] == 0:
                epoch_acc.zero_()
            t_epoch, first_step = time.perf_counter(), position["step"]  # (a resume continues an epoch)
            for i in range(position["step"], steps_per_epoch):
                if stop.before(position["global_step"]) or not alive():
                    break
                out = step_fn(epoch_data.batch(i, batch))  # [N, B, x_dim] -> [N, 4]
                if not fell_back and getattr(step_fn, "eager", False):
                    fell_back = True
                    note_fallback([runs[j] for j in alive()], position["global_step"], step_fn.reason)
                acc += out
                epoch_acc += out
                acc_n += 1
                position["step"], position["global_step"] = i + 1, position["global_step"] + 1
                if bar is not None:
                    bar.update(1)
                if acc_n >= cfg0.log_every:  # (>=: a resume may lower log_every)
                    means = (acc / acc_n).tolist()  # the one host sync per log_every steps
                    check(means, f"epoch {epoch + 1}, step {i + 1}")
                    for j in alive():
                        runs[j].log_train(means[j], lrs[epoch], position["global_step"])
                    if bar is not None and alive():
                        first = alive()[0]
                        bar.set_postfix({runs[first].objective.slug: f"{means[first][0]:.2f}"}, refresh=False)
                    acc.zero_()
                    acc_n = 0
                if diagnostics is not None and position["global_step"] % diagnostics.every == 0:
                    diagnostics(step, runs, alive(), position["global_step"])
            for j in alive():
                runs[j].state.update(position)
            if stop.requested or not alive():
                break

            # End of epoch: check before anything is written; then per run validate, log, evaluate;
            # then every run's checkpoint, back to back (a stack killed in between is left at two
            # positions only within those writes).
            check((epoch_acc / steps_per_epoch).tolist(), f"the end of epoch {epoch + 1}")
            finite = step.finite()
            for j in alive():
                if not finite[j]:
                    runs[j].error = (f"parameters became non-finite in epoch {epoch + 1}; stopped, and "
                                     f"{runs[j].checkpoint_status()}; lower schedule.lr")
            step.sync([r.model for r in runs])
            epoch_time = time.perf_counter() - t_epoch
            train_bounds = (epoch_acc[:, 0] / steps_per_epoch).tolist()
            position["epoch"], position["step"] = epoch + 1, 0
            wall = time.perf_counter() - t_start
            for j in alive():
                r = runs[j]
                vb = valid_bound(r.model, r.objective, data.valid, r.cfg.m, r.cfg.k, r.eval_gen)
                r.state["history"].append({"epoch": epoch + 1, "train_bound": train_bounds[j], "valid_bound": vb,
                                           "lr": lrs[epoch]})
                slug = r.objective.slug  # "bound", or jvi's "jvi_estimate"
                r.log.scalars({f"epoch/train_{slug}": train_bounds[j], f"epoch/valid_{slug}": vb,
                               "epoch/steps_per_s": (steps_per_epoch - first_step) / max(epoch_time, 1e-9),
                               "epoch/lr": lrs[epoch]}, position["global_step"])
                if data.image_shape is not None:
                    r.log_pictures(data, position["global_step"])
                r.state.update(position)
                r.state["wall_time"] = wall
                if r.cfg.eval.every and (epoch + 1) % r.cfg.eval.every == 0 and epoch + 1 < n_epochs:
                    with ev.memory_hint_for(r.cfg.eval):
                        metrics = ev.evaluate(r.model, data.test, r.cfg.eval, device)["metrics"]
                    r.log_eval(metrics, position["global_step"])
                    rundir.record_curve_point(r.dir, ev.curve_point(metrics, epoch + 1, position["global_step"]))
            for j in alive():
                runs[j].save(step.optimizer_state(j), epoch_acc[j], acc[j], acc_n)
    except BaseException as err:
        _close_logs(runs)
        if isinstance(err, Exception) and is_out_of_memory(err):
            samples = ", ".join(sorted({f"m={r.cfg.m} k={r.cfg.k}" for r in runs}))
            stacked = f", {n_runs} runs stacked" if n_runs > 1 else ""
            raise VaexpError(f"out of memory while training with {samples}, batch_size={batch}{stacked}: "
                             f"{allocation_detail(err)}; lower k "
                             f"(or m, batch_size){' or stack fewer runs' if n_runs > 1 else ''}") from None
        raise
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - t_start
    for j in alive():
        runs[j].state["wall_time"] = wall

    if stop.requested and alive():  # keep the work since the last checkpoint (mid-epoch too), unless it is not finite
        step.sync([r.model for r in runs])
        finite = step.finite()
        for j in alive():
            if finite[j]:
                runs[j].save(step.optimizer_state(j), epoch_acc[j], acc[j], acc_n)
            else:
                runs[j].error = (f"parameters became non-finite by the interruption; stopped, and "
                                 f"{runs[j].checkpoint_status()}; lower schedule.lr")
        # (a run that diverged first is not saved: its divergence is recorded and said, not lost)
        diverged = [r for r in runs if r.error is not None]
        for r in diverged:
            _record_divergence(r, n_epochs)
        for r in runs:
            r.log.close()
        if len(diverged) == n_runs:  # nothing was kept: the divergence is the result (see _record)
            return [NonFiniteBound(r.error) for r in runs]
        where = describe_position(runs[0].state, n_epochs, steps_per_epoch)
        if n_runs == 1:
            raise Interrupted(runs[0].dir, runs[0].state,
                              f"interrupted with {where}; checkpoint saved in {runs[0].dir}. Re-run with "
                              f"resume={runs[0].dir} to continue")
        kept = [r for r in runs if r.error is None]
        dirs = ", ".join(str(r.dir) for r in kept)
        lost = "".join(f"; {r.dir} diverged: {r.error}" for r in diverged)
        raise Interrupted(kept[0].dir, kept[0].state,
                          f"interrupted with {where}; the checkpoints of the {len(kept)} stacked runs are saved "
                          f"({dirs}){lost}. Run the same sweep again (same sweep=<name>) to continue them stacked, "
                          f"or resume=<dir> to continue one alone")
    # Every run's training recorded before any evaluation: a stack interrupted while it evaluates
    # one run leaves the others trained and recorded, not only checkpointed.
    trained = [_record(r, n_epochs, data, device) for r in runs]
    return [t if isinstance(t, Exception) else _finish(r, runs, i, n_epochs, data, device, t)
            for i, (r, t) in enumerate(zip(runs, trained))]


def _close_logs(runs: Sequence[Run]) -> None:
    for r in runs:
        try:
            r.log.close()
        except Exception:  # noqa: BLE001 - closing must not hide the error that got us here
            pass


def _record_divergence(r: Run, n_epochs: int) -> None:
    if r.saved_state is not None:  # a run with earlier evaluations: they are now of a diverged run
        rundir.record_training(r.dir, rundir.training_record(r.saved_state, n_epochs, "diverged", r.error),
                               create=False)


def _record(r: Run, n_epochs: int, data: Dataset, device: torch.device) -> Union[Dict, VaexpError]:
    """The end of one run's training: recorded in metrics.json, its "train" returned (or its error:
    a non-finite bound, or metrics.json that cannot be written)."""
    if r.error is not None:
        _record_divergence(r, n_epochs)
        r.log.close()
        return NonFiniteBound(r.error)
    train = r.train_summary(device, data)
    try:
        rundir.record_training(r.dir, rundir.training_record(r.state, n_epochs, "trained"), train=train)
    except OSError as err:
        r.log.close()
        return VaexpError(f"{os_error_line(err)}; training is complete and checkpointed in {r.dir}: once it can be "
                          f"written, re-run with resume={r.dir} to evaluate it")
    return train


def _finish(r: Run, runs: List[Run], i: int, n_epochs: int, data: Dataset, device: torch.device,
            train: Dict) -> Union[Dict, VaexpError]:
    """The end of one recorded run (`train`: its record): its test evaluation added (or its error)."""
    stacked = len(runs) > 1
    print(f"vaexp: training done ({n_epochs} epochs, {r.state['global_step']} steps, {r.state['wall_time']:.0f} s"
          + (f", {len(runs)} runs stacked); evaluating {r.dir}" if stacked else "); evaluating")
          + f" on the test set (K={r.cfg.eval.k})", flush=True)
    try:
        with ev.memory_hint_for(r.cfg.eval):
            result = ev.evaluate(r.model, data.test, r.cfg.eval, device, progress=r.cfg.progress)
    except KeyboardInterrupt:
        _close_logs(runs[i:])
        if stacked:
            raise Interrupted(r.dir, r.state, f"interrupted during the final evaluation of {r.dir}; training of the "
                                              f"stacked runs is complete, checkpointed and recorded: `vaexp eval "
                                              f"<dir>` evaluates each, and running the sweep again finishes them") from None
        raise Interrupted(r.dir, r.state, f"interrupted during the final evaluation; training is complete, "
                                          f"checkpointed and recorded in {r.dir}: `vaexp eval {r.dir}` evaluates it "
                                          f"(so does re-running with resume={r.dir})") from None
    except VaexpError as err:
        r.log.close()
        return VaexpError(f"{err}; training is complete and checkpointed in {r.dir}: `vaexp eval {r.dir}` with "
                          f"lower settings evaluates it")
    checkpoint = rundir.checkpoint_record(r.state, n_epochs)
    try:
        rundir.record_evaluation(r.dir, result["metrics"], result["per_example"], rundir.as_dict(r.cfg.eval),
                                 checkpoint, by="train")
    except OSError as err:
        r.log.close()
        return VaexpError(f"{os_error_line(err)}; the evaluation (test NLL {result['metrics']['nll']:.3f}) is not "
                          f"recorded, but training is complete and checkpointed in {r.dir}: `vaexp eval {r.dir}` "
                          f"records it (the same numbers: the evaluation is seeded)")
    r.log_eval(result["metrics"], r.state["global_step"], final=True)
    summary = {"train": train, "test": result["metrics"]}
    r.log_hparams(summary)
    r.log.close()
    return summary


def _start(runs: Sequence[Run], n_epochs: int) -> None:
    """Before the first step: config.yaml (first start, or a resume that changed a setting), and
    "training" in metrics.json of a run that has earlier evaluations (they are now out of date)."""
    for r in runs:
        rundir.record_config(r.cfg, r.dir)
        if r.state["epoch"] < n_epochs:
            rundir.record_training(r.dir, rundir.training_record(r.state, n_epochs, "training"), create=False)


def train(cfg: Any, run_dir: Path, stop: Optional[Stop] = None) -> Dict:
    """Train one run in `run_dir` and evaluate it: fit of a stack of one."""
    cfg = rundir.with_absolute_data_paths(cfg)  # recorded as read: eval or resume= from elsewhere finds them
    with rundir.locked(run_dir):
        device = resolve_device(cfg.device)
        runtime.hold_threads_for(device)
        data = load_dataset(cfg.dataset, device)
        ev.check_test_size(cfg.eval, data.test.shape[0], cfg.dataset.name)
        run = open_run(cfg, run_dir, data, device)
        try:
            _start([run], len(epoch_learning_rates(cfg.schedule)))
        except BaseException:
            _close_logs([run])
            raise
        result = fit([run], data, device, stop)[0]
    if isinstance(result, Exception):
        raise result
    return result


def train_stacked(cfgs: Sequence[Any], run_dirs: Sequence[Path], stop: Optional[Stop] = None
                  ) -> List[Union[Dict, VaexpError]]:
    """Train compatible runs (one stack_key) as one stack; per run its summary or, for a run
    whose bound became non-finite (or whose results cannot be written), the error it would raise
    alone."""
    keys = {stack_key(c) for c in cfgs}
    if None in keys or len(keys) != 1:
        raise VaexpError("these runs cannot be stacked: they differ in a shared setting (see "
                         "vaexp.training.step.stack_key)")
    cfgs = [rundir.with_absolute_data_paths(c) for c in cfgs]
    with contextlib.ExitStack() as held:
        for d in run_dirs:
            held.enter_context(rundir.locked(Path(d)))
        device = resolve_device(cfgs[0].device)
        runtime.hold_threads_for(device)
        data = load_dataset(cfgs[0].dataset, device)
        for cfg in cfgs:
            ev.check_test_size(cfg.eval, data.test.shape[0], cfg.dataset.name)
        runs: List[Run] = []
        try:
            for cfg, d in zip(cfgs, run_dirs):
                runs.append(open_run(cfg, Path(d), data, device))
        except BaseException:  # (Ctrl-C too) the opened runs' event files closed before anything rolls back
            _close_logs(runs)
            raise
        positions = {(r.state["epoch"], r.state["step"], r.state["global_step"]) for r in runs}
        if len(positions) != 1 or len({r.resumed for r in runs}) != 1:
            _close_logs(runs)
            raise VaexpError(f"stacked runs must continue from the same point; their checkpoints are at "
                             f"(epoch, step, global step) {sorted(positions)}")
        try:
            _start(runs, len(epoch_learning_rates(cfgs[0].schedule)))
        except BaseException:
            _close_logs(runs)
            raise
        return fit(runs, data, device, stop)
