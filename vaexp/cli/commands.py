"""The commands: compose the config (Hydra) -> call the library -> print. Nothing else.

Invariants: :func:`_guard` is each command's one error boundary: every exception becomes one
line on stderr (vaexp.errors.fault_line: user errors, file-system faults, memory exhaustion,
damaged files, bugs) and a non-zero exit, with no traceback unless VAEXP_DEBUG=1 or
HYDRA_FULL_ERROR=1; SIGTERM is turned into an interruption for the whole command; the run
directory the callback locked is released here, after removing what the command created when
the run holds no result yet. In a multirun a failing job records error.txt and returns, so the
sweep goes on (its summary at the end exits non-zero). The libraries that need torch (training,
evaluation, snr) are imported inside the command that runs them, so `vaexp --help`, completion
and `vaexp report` start without loading torch (~1 s).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from vaexp import rundir
from vaexp.cli import sweep
from vaexp.errors import Interrupted, Terminated, VaexpError, debugging, fault_line, memory_hint
from vaexp.report import report
from vaexp.schema import CompareConfig, EvalCommandConfig, ReportConfig, SnrConfig, TrainConfig, apply_mk


class Command(NamedTuple):
    """What vaexp knows of one command, kept here only: the argv rewriting, the callback's checks
    and run directory, the error boundary, the sweep summary and completion read it."""
    config_name: str  # conf/<config_name>.yaml
    task: Callable[[DictConfig], object]
    schema: type  # its structured config (vaexp.schema): the settings it has
    positional: str = ""  # "run": `vaexp <cmd> <dir>` is run=<dir>; "dirs": `<dir>...` is dirs=[...]
    # The settings that choose the run directory it writes into (locked, a transaction), as the
    # user writes them, the first given naming it in a message; () when it writes none.
    dir_settings: Tuple[str, ...] = ()
    keeps: Tuple[str, ...] = ()  # files that make its directory a result: a failure leaves the directory
    scratch: Tuple[str, ...] = ()  # its own files there, removed on failure even beside a result
    done_file: str = ""  # what a finished sweep job of it leaves ("": vaexp.rundir.judge, train's)
    memory_lower: str = "k, eval.k or eval.chunk"

    @property
    def writes_run_dir(self) -> bool:
        return bool(self.dir_settings)


def _say(msg: str) -> None:
    print(msg, flush=True)


def _stop_at_step() -> Optional[int]:
    """$VAEXP_INTERRUPT_AT_STEP: stop before that global step as Ctrl-C would (a deterministic
    interruption for tests and for trying out resume)."""
    value = os.environ.get("VAEXP_INTERRUPT_AT_STEP")
    return int(value) if value else None


def raise_terminated(signum, frame):
    raise Terminated()


def _outcome(tx: Optional[rundir.Transaction], removed: bool, job: str, err: BaseException) -> str:
    """What the failure left, for the end of the message (vaexp's own errors say what is kept)."""
    if tx is None:
        return ""
    if removed:
        return f"; nothing was kept ({tx.path} was made by this command and is removed)" if not tx.before.existed \
            else f"; what this command added to {tx.path} is removed"
    if job == "train" and (tx.path / rundir.CHECKPOINT).exists() and not isinstance(err, (VaexpError, Interrupted)):
        return f"; {tx.path} keeps the run and its last checkpoint (resume={tx.path} continues it)"
    return ""


def _guard(command: Command) -> Callable[[DictConfig], object]:
    """The command's one error boundary (see the module docstring)."""
    fn = command.task

    def wrapped(cfg: DictConfig):
        in_sweep = sweep.in_multirun()
        job_dir = sweep.current_job_dir()
        job = HydraConfig.get().job.name
        old_term = signal.signal(signal.SIGTERM, raise_terminated) \
            if threading.current_thread() is threading.main_thread() else None
        tx = None
        try:
            if command.writes_run_dir:
                tx = rundir.held(job_dir) or rundir.begin(job_dir, command.keeps, command.scratch)
            if in_sweep:
                sweep.clear_failure(job_dir)
            return fn(cfg)
        except Exception as err:  # noqa: BLE001 - the boundary: every fault becomes one line
            return _fail(err, command, job, job_dir, tx, in_sweep)
        except KeyboardInterrupt as err:  # Ctrl-C, SIGTERM (Terminated): the whole command stops, sweep too
            line, code = fault_line(err)
            removed = tx.rollback() if tx is not None and not in_sweep else False
            print(f"vaexp: {line}{_outcome(tx, removed, job, err)}", file=sys.stderr, flush=True)
            sys.exit(code)
        finally:
            if tx is not None:
                tx.end()
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)

    wrapped.__name__ = fn.__name__
    return wrapped


def _fail(err: Exception, command: Command, job: str, job_dir: Path, tx: Optional[rundir.Transaction],
          in_sweep: bool):
    line, code = fault_line(err, command.memory_lower, tx.path if tx is not None else None)
    if debugging():
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    if in_sweep and not isinstance(err, Interrupted):  # an interruption stops the whole sweep
        if isinstance(err, (rundir.RunDirBusy, rundir.RunDirTaken)):  # not this job's directory: leave it alone
            print(f"vaexp: job {job_dir} failed: {line}", file=sys.stderr, flush=True)
            return {"failed": line, "dir": str(job_dir)}
        if code == 1:  # unexpected: its traceback goes into error.txt
            line, details = sweep.describe_exception(err)
            print(f"vaexp: job {job_dir} failed: {line} (traceback in {job_dir / rundir.ERROR_FILE})",
                  file=sys.stderr, flush=True)
            return sweep.record_failure(job_dir, line, details)
        print(f"vaexp: job {job_dir} failed: {line}", file=sys.stderr, flush=True)
        return sweep.record_failure(job_dir, line)
    removed = tx.rollback() if tx is not None and not in_sweep and not isinstance(err, rundir.RunDirBusy) else False
    print(f"vaexp: {line}{_outcome(tx, removed, job, err)}", file=sys.stderr, flush=True)
    sys.exit(code)


def run_train(cfg: DictConfig):
    from vaexp.cli.checks import validate_train_dir  # (torch) see the module docstring
    from vaexp.evaluate import format_table
    from vaexp.training.loop import Stop, train

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    if sweep.in_multirun():  # a single run's directory was checked by the callback, under its lock
        cfg = validate_train_dir(cfg, run_dir, hc.overrides.task)
    else:
        cfg = rundir.effective_config(apply_mk(cfg), run_dir, hc.overrides.task, TrainConfig)
    stop = Stop(at_step=_stop_at_step())
    if cfg.get("stack") and sweep.in_multirun() and sweep.stack_plan is not None:
        stacked = sweep.stack_plan.result(run_dir, _say, stop, int(hc.job.num))
        if stacked is not None:
            return stacked
    done = rundir.finished_metrics(run_dir, cfg)
    if done is not None:
        _say(f"vaexp: {run_dir} already finished; its results:\n{format_table(done['test'])}")
        return done
    _say(f"vaexp: run directory {run_dir}")
    summary = train(cfg, run_dir, stop)
    _say(f"vaexp: {cfg.dataset.name} {cfg.model.name} {cfg.objective.name} m={cfg.m} k={cfg.k} "
         f"{cfg.estimator.name}: {rundir.final_train(summary['train'])}\n"
         f"{format_table(summary['test'])}\n  metrics: {run_dir / rundir.METRICS}")
    return summary


def _eval_settings(cfg: DictConfig, saved: DictConfig) -> DictConfig:
    """The run's own eval settings, with the eval.* given on this command line on top: by default
    `vaexp eval` repeats the evaluation the run was trained with."""
    settings = saved.eval.copy()
    for key in rundir.override_keys(HydraConfig.get().overrides.task):
        if key.startswith("eval."):
            OmegaConf.update(settings, key[len("eval."):], OmegaConf.select(cfg, key), merge=False)
    return settings


def run_eval(cfg: DictConfig):
    from vaexp.cli.checks import validate_eval
    from vaexp.evaluate import evaluate_run, format_table  # (torch) see the module docstring

    run_dir = Path(cfg.run)
    settings = _eval_settings(cfg, rundir.load_config(run_dir, TrainConfig))
    validate_eval(settings)  # the run's own settings with this command's on top
    result = evaluate_run(run_dir, settings, cfg.device, progress=cfg.progress)
    _say(f"vaexp: {run_dir} (epoch {result['epoch']}, step {result['step']})\n{format_table(result['metrics'])}")
    return result["metrics"]


_SNR_MEMORY = "chunk (draws per vectorised pass, e.g. chunk=1), or the largest k or m of the grid"


def run_snr(cfg: DictConfig):
    from vaexp.snr import snr  # (torch) see the module docstring

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    _say(f"vaexp: snr output directory {out_dir}")
    grid = f"k={list(cfg.k)} m={list(cfg.m)}, draws={cfg.draws}, chunk={cfg.chunk}"
    with memory_hint(f"in vaexp snr with {grid}", _SNR_MEMORY):
        result = snr(cfg, out_dir)
    if result["finished"]:  # as vaexp train reports a finished run
        _say(f"vaexp: {out_dir} already holds this measurement; its results:\n{result['table']}")
        return result
    _say(f"{result['table']}\n  written: {out_dir}/snr.csv, snr.png, snr.txt, config.yaml, TensorBoard events")
    return result


def run_report(cfg: DictConfig):
    return report(list(cfg.dirs), out=cfg.out, plots=cfg.plots, curves=cfg.curves)


def run_compare(cfg: DictConfig):
    from vaexp.report.compare import compare  # (torch: the per-image files) see the module docstring

    result = compare(list(cfg.dirs), out=cfg.out)
    _say(result["markdown"].rstrip())
    print(f"vaexp: {len(result['rows'])} comparison(s) of {len(result['settings'])} setting(s); written to "
          f"{result['out']}: compare.md, compare.csv", file=sys.stderr)
    return result


# The one list of commands (the CLI word -> its facts). eval writes into its run=; snr reads run=
# but writes under out_root; train resumes in resume=.
COMMANDS: Dict[str, Command] = {
    "train": Command("train", run_train, TrainConfig, dir_settings=("hydra.run.dir", "resume", "out_root"),
                     keeps=(rundir.CHECKPOINT, rundir.METRICS),
                     memory_lower="k (or m, batch_size), or eval.chunk / eval.k for the evaluation"),
    "eval": Command("evaluate", run_eval, EvalCommandConfig, "run", dir_settings=("hydra.run.dir", "run"),
                    keeps=(rundir.CHECKPOINT, rundir.METRICS), scratch=("eval.log",),
                    memory_lower="eval.chunk (0 sizes blocks automatically) or eval.k"),
    "snr": Command("snr", run_snr, SnrConfig, "run", dir_settings=("hydra.run.dir", "out_root"),
                   done_file=rundir.SNR_CSV, memory_lower=_SNR_MEMORY),
    "report": Command("report", run_report, ReportConfig, "dirs"),
    "compare": Command("compare", run_compare, CompareConfig, "dirs"),
}


def hydra_entry(command: Command) -> Callable[[], None]:
    return hydra.main(config_path="pkg://vaexp.conf", config_name=command.config_name,
                      version_base="1.3")(_guard(command))
