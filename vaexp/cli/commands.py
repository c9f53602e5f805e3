"""The commands: compose the config (Hydra) -> call the library -> print. Nothing else.

Invariants: a user error (VaexpError) is one line on stderr and exit status 2; an interruption
exits 130; in a multirun a failing job records error.txt and returns, so the sweep goes on (its
summary at the end exits non-zero). The libraries that need torch (training, evaluation, snr)
are imported inside the command that runs them, so `vaexp --help`, completion and `vaexp
report` start without loading torch (~1 s).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Dict, NamedTuple, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from vaexp import rundir
from vaexp.cli import sweep
from vaexp.errors import Interrupted, VaexpError
from vaexp.report import report
from vaexp.schema import TrainConfig, apply_mk


class Command(NamedTuple):
    config_name: str
    task: Callable[[DictConfig], object]


def _say(msg: str) -> None:
    print(msg, flush=True)


def _stop_at_step() -> Optional[int]:
    """$VAEXP_INTERRUPT_AT_STEP: stop before that global step as Ctrl-C would (a deterministic
    interruption for tests and for trying out resume)."""
    value = os.environ.get("VAEXP_INTERRUPT_AT_STEP")
    return int(value) if value else None


def _guard(fn: Callable[[DictConfig], object]) -> Callable[[DictConfig], object]:
    """User errors and interruptions as one line; a failing sweep job records its error."""

    def wrapped(cfg: DictConfig):
        in_sweep = sweep.in_multirun()
        if in_sweep:
            job_dir = sweep.current_job_dir()
            sweep.clear_failure(job_dir)
        try:
            return fn(cfg)
        except VaexpError as err:
            if in_sweep:
                print(f"vaexp: job {job_dir} failed: {err}", file=sys.stderr, flush=True)
                return sweep.record_failure(job_dir, str(err))
            print(f"vaexp: {err}", file=sys.stderr)
            sys.exit(err.exit_code)
        except Interrupted as err:
            print(f"vaexp: {err}", file=sys.stderr)
            sys.exit(130)
        except KeyboardInterrupt:
            print("vaexp: interrupted", file=sys.stderr)
            sys.exit(130)
        except Exception as err:  # noqa: BLE001 - in a sweep, a bug in one job must not cost the others
            if not in_sweep:
                raise
            line, details = sweep.describe_exception(err)
            print(f"vaexp: job {job_dir} failed: {line} (traceback in {job_dir / rundir.ERROR_FILE})",
                  file=sys.stderr, flush=True)
            return sweep.record_failure(job_dir, line, details)

    wrapped.__name__ = fn.__name__
    return wrapped


def run_train(cfg: DictConfig):
    from vaexp.evaluate import format_table  # (torch) see the module docstring
    from vaexp.training.loop import Stop, train

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    fresh = not (run_dir / rundir.CONFIG).exists()
    cfg = rundir.prepare(apply_mk(cfg), run_dir, hc.overrides.task, TrainConfig)
    stop = Stop(at_step=_stop_at_step())
    if cfg.get("stack") and sweep.in_multirun() and sweep.stack_plan is not None:
        stacked = sweep.stack_plan.result(run_dir, _say, stop)
        if stacked is not None:
            return stacked
    done = rundir.finished(run_dir)
    if done is not None and "test" in done and not rundir.more_epochs(cfg, run_dir):
        _say(f"vaexp: {run_dir} already finished; its results:\n{format_table(done['test'])}")
        return done
    _say(f"vaexp: run directory {run_dir}")
    try:
        summary = train(cfg, run_dir, stop)
    except VaexpError:
        if fresh and not sweep.in_multirun():  # e.g. no data: leave no half-made run directory behind
            rundir.remove_unstarted(run_dir)
        raise
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
    from vaexp.evaluate import evaluate_run, format_table  # (torch) see the module docstring

    run_dir = Path(cfg.run)
    saved = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(run_dir / rundir.CONFIG))
    result = evaluate_run(run_dir, _eval_settings(cfg, saved), cfg.device, progress=cfg.progress)
    _say(f"vaexp: {run_dir} (epoch {result['epoch']}, step {result['step']})\n{format_table(result['metrics'])}")
    return result["metrics"]


def run_snr(cfg: DictConfig):
    from vaexp.snr import snr  # (torch) see the module docstring

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    _say(f"vaexp: snr output directory {out_dir}")
    result = snr(cfg, out_dir)
    _say(f"{result['table']}\n  written: {out_dir}/snr.csv, snr.png, snr.txt, TensorBoard events")
    return result


def run_report(cfg: DictConfig):
    return report(list(cfg.dirs), out=cfg.out, plots=cfg.plots, curves=cfg.curves)


COMMANDS: Dict[str, Command] = {
    "train": Command("train", run_train),
    "eval": Command("evaluate", run_eval),
    "snr": Command("snr", run_snr),
    "report": Command("report", run_report),
}


def hydra_entry(command: Command) -> Callable[[], None]:
    return hydra.main(config_path="pkg://vaexp.conf", config_name=command.config_name,
                      version_base="1.3")(_guard(command.task))
