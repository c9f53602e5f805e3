"""The Hydra callback every command's config names: checks before any directory exists.

Invariants: on_run_start / on_multirun_start run before Hydra creates the job (or sweep)
directory, so a refused config leaves nothing behind; in a sweep every job is composed and
checked up front; on_multirun_end prints one summary and exits non-zero when a job failed.
"""
from __future__ import annotations

import sys
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from vaexp import rundir
from vaexp.cli import sweep
from vaexp.errors import VaexpError
from vaexp.report import check_dirs


def _check(config: DictConfig) -> None:
    job = config.hydra.job.name if "hydra" in config else "train"
    if job == "report":
        check_dirs(config.dirs)
        return
    from vaexp.cli.checks import validate_command  # needs torch (the registries); `vaexp report` does not

    validate_command(config)


def _report_and_exit(err: VaexpError) -> None:
    print(f"vaexp: {err}", file=sys.stderr)
    sys.exit(err.exit_code)


def _check_grid_needs_multirun(config: DictConfig) -> None:
    """An experiment preset that defines a grid (hydra.sweeper.params) runs with -m; without it
    Hydra would silently run one job with the defaults of the swept keys."""
    if "hydra" not in config or "sweeper" not in config.hydra:
        return
    params = config.hydra.sweeper.get("params") or {}
    given = set(rundir.override_keys(config.hydra.overrides.task))
    missing = [key for key in params if key not in given]
    if missing:
        grid = " × ".join(f"{key}={params[key]}" for key in params)
        raise VaexpError(f"this config defines a sweep ({grid}) but the command has no -m; run the whole grid "
                         f"with `vaexp {config.hydra.job.name} -m ...`, or pick one job by giving "
                         f"{', '.join(f'{key}=...' for key in missing)}")


class ValidateCallback(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            _check_grid_needs_multirun(config)
            _check(config)
        except VaexpError as err:
            _report_and_exit(err)

    def on_multirun_start(self, config: DictConfig, config_name: Optional[str] = None, **kwargs: Any) -> None:
        self._job_dirs = None
        if "BasicSweeper" not in str(config.hydra.sweeper.get("_target_", "")):
            return  # another sweeper chooses its own jobs
        try:
            jobs = sweep.sweep_jobs(config, config_name)
            for job_overrides, job_cfg in jobs:
                try:
                    _check(job_cfg)
                except VaexpError as err:
                    raise VaexpError(f"{err} (in the sweep job {' '.join(job_overrides)})") from None
        except VaexpError as err:
            _report_and_exit(err)
        self._sweep_dir = str(config.hydra.sweep.dir)
        self._job_dirs = [sweep.job_directory(self._sweep_dir, job_cfg) for _, job_cfg in jobs]
        sweep.stack_plan = None
        if any(job_cfg.get("stack") for _, job_cfg in jobs):
            from vaexp.cli.stacking import StackPlan  # the trainer (torch): only stack=true sweeps need it here

            sweep.stack_plan = StackPlan(jobs, self._job_dirs)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """One summary of the sweep; a non-zero exit when a job failed or did not finish."""
        if not getattr(self, "_job_dirs", None):
            return
        sweep.stack_plan = None
        text, ok = sweep.summary(self._sweep_dir, self._job_dirs)
        print(text, file=sys.stdout if ok else sys.stderr, flush=True)
        if not ok:
            sys.exit(1)
