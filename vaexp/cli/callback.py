"""The Hydra callback every command's config names: checks before any directory exists, and the
run directory taken (locked) before Hydra writes into it.

Invariants: on_run_start / on_multirun_start run before Hydra creates the job (or sweep)
directory, so a refused config leaves nothing behind; a single run's directory is then created
and locked here (vaexp.rundir.begin: the snapshot of what existed is taken first), the checks
that read it run under the lock, and the command's error boundary (vaexp.cli.commands._guard)
releases it; in a sweep every job is composed and checked up front, and the sweep directory
created; on_multirun_end prints one summary and exits non-zero when a job failed.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import tempfile
import traceback
import typing
from pathlib import Path
from typing import Any, List, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from vaexp import rundir
from vaexp.cli import sweep
from vaexp.cli.commands import COMMANDS, Command
from vaexp.cli.hydra_errors import exit_with_line
from vaexp.errors import VaexpError, debugging, os_error_line
from vaexp.report import check_dirs
from vaexp.rundir.layout import PATH_SETTINGS
from vaexp.schema import TrainConfig, apply_mk


def _job(config: DictConfig) -> str:
    return str(config.hydra.job.name) if "hydra" in config else "train"


def _command(config: DictConfig) -> Optional[Command]:
    return COMMANDS.get(_job(config))


def _check_paths(config: DictConfig) -> None:
    """No setting that names a path is empty (vaexp.rundir.layout.PATH_SETTINGS says why). An
    interpolated one (hydra.run.dir, hydra.sweep.dir by default) is built from settings checked
    here themselves, and is not resolved: its ${now:...} would be fixed at this moment, apart
    from the time the sweep's other jobs and Hydra resolve it."""
    for key in PATH_SETTINGS:
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(config, parent_key, default=None) if parent_key else config
        if not isinstance(parent, DictConfig):
            continue
        try:  # (not `leaf in parent`: that resolves it; a command's schema lacks the others' keys)
            if OmegaConf.is_interpolation(parent, leaf):
                continue
            value = parent[leaf]
        except Exception:  # noqa: BLE001 - no such setting in this command
            continue
        if isinstance(value, str) and not value.strip():
            raise VaexpError(f"{key}={value}: an empty path (an unset shell variable?); give a directory" + (
                "" if key in ("resume", "run") else f", or leave {key}= out for its default"))


def _check(config: DictConfig) -> None:
    _check_paths(config)
    job = _job(config)
    command = _command(config)
    if command is not None and command.positional == "dirs":
        check_dirs(config.dirs, job)
        return
    from vaexp.cli.checks import validate_command  # needs torch (the registries); `vaexp report` does not

    validate_command(config)


def _report_and_exit(err: BaseException, config: DictConfig) -> None:
    """One line and the exit status. Any exception, not only VaexpError: Hydra only *warns* about
    an exception raised in a callback and then runs the job anyway, unchecked."""
    if debugging():
        traceback.print_exc()
    exit_with_line(err, _job(config))


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


def schema_keys(cls: type, prefix: str = "") -> List[str]:
    """Every dotted setting of a config dataclass."""
    hints = typing.get_type_hints(cls)
    keys: List[str] = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        keys += schema_keys(kind, f"{prefix}{f.name}.") if dataclasses.is_dataclass(kind) else [prefix + f.name]
    return keys


def _check_additions(config: DictConfig) -> None:
    """`+key=value` adds a key the schema does not have, which nothing would read: refused, unless
    it adds a config group the defaults lack or is Hydra's own (+hydra...); `+experiment=` Hydra
    itself refuses (experiment is in the defaults list), with a line from vaexp.cli.hydra_errors.
    `++key=value` is fine for a key the command has (it is then key=value)."""
    if "hydra" not in config:
        return
    job = str(config.hydra.job.name)
    keys = schema_keys((_command(config) or COMMANDS["train"]).schema)
    groups = set(config.hydra.runtime.choices.keys()) if "runtime" in config.hydra else set()
    for override in map(str, config.hydra.overrides.task):
        if not override.startswith("+"):
            continue
        key = override.lstrip("+").split("=", 1)[0]
        if key.split("@", 1)[0] in groups or key.startswith("hydra"):
            continue
        if override.startswith("++") and (key in keys or any(k.startswith(key + ".") for k in keys)):
            continue
        near = [k for k in keys if k.endswith("." + key)] or difflib.get_close_matches(key, keys, n=1)
        hint = f", or did you mean {near[0]}=...?" if near else ""
        raise VaexpError(f"{override}: vaexp {job} has no setting {key} (a leading + adds a key that nothing "
                         f"reads); drop it{hint}")


def _dir_setting(config: DictConfig, command: Command) -> str:
    """The setting that chose the command's directory, as the user would write it."""
    overrides = list(config.hydra.overrides.hydra) + list(config.hydra.overrides.task)
    given = {o.split("=", 1)[0]: o for o in map(str, overrides)}
    for key in command.dir_settings:
        if key in given:
            return given[key]
    return f"out_root={config.get('out_root', 'outputs')}"


def _hold_run_dir(config: DictConfig) -> None:
    """train / eval / snr: create and lock the directory the command writes (taking the snapshot
    of what was there first), then, for train and snr, the checks that read it (before Hydra
    writes its .hydra/ record there: a refused directory is left as it was)."""
    job, command = str(config.hydra.job.name), _command(config)
    if command is None or not command.writes_run_dir:
        return
    path = Path(str(config.hydra.run.dir))
    try:
        tx = rundir.begin(path, command.keeps, command.scratch)
    except OSError as err:
        if job == "eval":
            raise VaexpError(f"run={path}: cannot write there ({err.strerror or err}); vaexp eval adds its result to "
                             f"{path / rundir.METRICS}: make the directory writable, or copy the run (cp -r) and "
                             f"evaluate the copy") from None
        if job == "train" and config.get("resume"):  # out_root= and hydra.run.dir= do not apply to a resume
            raise VaexpError(f"resume={path}: cannot write there ({err.strerror or err}); a resumed run goes on "
                             f"in its own directory: make it writable, or copy the run (cp -r) and resume the "
                             f"copy") from None
        what = "run" if job == "train" else "output"
        raise VaexpError(f"{_dir_setting(config, command)}: cannot create the {what} directory: "
                         f"{os_error_line(err)}") from None
    if job not in ("train", "snr"):
        return
    from vaexp.cli.checks import validate_train_dir  # torch; see _check
    from vaexp.snr import check_out_dir

    try:
        if job == "train":
            validate_train_dir(config, path, config.hydra.overrides.task)
        else:
            check_out_dir(config, path)
    except BaseException:
        tx.rollback()
        tx.end()
        raise


def _make_sweep_dir(config: DictConfig) -> None:
    """The sweep directory exists and takes files before Hydra writes multirun.yaml into it."""
    sweep_dir = Path(os.path.abspath(str(config.hydra.sweep.dir)))
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=sweep_dir):
            pass
    except OSError as err:
        given = [o for o in map(str, config.hydra.overrides.hydra) if o.startswith("hydra.sweep.dir=")]
        setting = given[0] if given else f"out_root={config.get('out_root', 'outputs')}"
        if err.filename is not None and Path(str(err.filename)).parent == sweep_dir:  # the probe file, not a name to show
            err = OSError(err.errno, err.strerror, str(sweep_dir))
        raise VaexpError(f"{setting}: cannot create the sweep directory: {os_error_line(err)}") from None


def _check_shared_job_dirs(jobs, job_dirs) -> None:
    """Jobs whose directories coincide (named without a setting they differ in) are one run: the
    first runs it and the others find its result. That holds only when they differ in runtime-only
    settings alone; otherwise the sweep is refused here, before anything is written (the later job
    would be refused in a directory the earlier one has just filled, or, stacked, train into it)."""
    first = {}
    for (job_overrides, job_cfg), job_dir in zip(jobs, job_dirs):
        if job_dir is None:
            continue
        task = rundir.task_config(job_cfg)
        settings = rundir.described(apply_mk(task) if "mk" in task else task)
        seen = first.setdefault(os.path.abspath(str(job_dir)), (job_overrides, settings))
        diffs = [k for k in sorted(set(settings) | set(seen[1])) if settings.get(k) != seen[1].get(k)]
        if diffs:
            shown = ", ".join(f"{k}={seen[1].get(k)} vs {settings.get(k)}" for k in diffs[:4])
            raise VaexpError(f"the sweep jobs {' '.join(seen[0]) or '(no overrides)'} and {' '.join(job_overrides)} "
                             f"would both run in {job_dir}, but differ in {shown}; name the job directories by "
                             f"what differs (e.g. the default hydra.sweep.subdir=${{hydra.job.override_dirname}}); "
                             f"nothing was run")


def _check_job_dirs(jobs, job_dirs) -> None:
    """A sweep job whose directory holds a run with other settings (or another command's output)
    would be refused there, after Hydra has rewritten that run's .hydra/ record: refused here, for
    the whole sweep, before anything is written (re-running a sweep with its own settings passes)."""
    for (job_overrides, job_cfg), job_dir in zip(jobs, job_dirs):
        if job_dir is None or not (job_dir / rundir.CONFIG).is_file():
            continue
        try:
            rundir.effective_config(apply_mk(rundir.task_config(job_cfg)), job_dir, job_overrides, TrainConfig)
        except rundir.RunDirTaken as err:
            raise VaexpError(f"{err} (in the sweep job {' '.join(job_overrides)}; nothing was run)") from None
        except VaexpError:
            continue  # a damaged run (an unreadable config.yaml): that job fails alone, with its own message


def _check_snr_job_dirs(jobs, job_dirs) -> None:
    """An snr sweep job whose directory holds another command's output, or a measurement with other
    settings, would be refused there after Hydra has rewritten its .hydra/ record (vaexp.snr.
    check_out_dir): refused here, for the whole sweep, before anything is written."""
    from vaexp.snr import check_out_dir  # torch; see _check

    for (job_overrides, job_cfg), job_dir in zip(jobs, job_dirs):
        if job_dir is None or not job_dir.is_dir():
            continue
        try:
            check_out_dir(job_cfg, job_dir)
        except rundir.RunDirTaken as err:
            raise VaexpError(f"{err} (in the sweep job {' '.join(job_overrides)}; nothing was run)") from None
        except VaexpError:
            continue  # a damaged file (an unreadable config.yaml): that job fails alone, with its own message


class ValidateCallback(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            _check_grid_needs_multirun(config)
            _check_additions(config)
            _check(config)
            _hold_run_dir(config)
        except Exception as err:  # noqa: BLE001 - see _report_and_exit
            _report_and_exit(err, config)

    def on_multirun_start(self, config: DictConfig, config_name: Optional[str] = None, **kwargs: Any) -> None:
        self._job_dirs = None
        try:
            _check_additions(config)
        except Exception as err:  # noqa: BLE001 - see _report_and_exit
            _report_and_exit(err, config)
        if "BasicSweeper" not in str(config.hydra.sweeper.get("_target_", "")):
            return  # another sweeper chooses its own jobs
        try:
            jobs = sweep.sweep_jobs(config, config_name)
            for job_overrides, job_cfg in jobs:
                try:
                    if job_cfg.get("resume"):
                        raise VaexpError(f"resume={job_cfg.resume}: resume= continues one run, not a sweep (-m); "
                                         f"drop -m, or run the sweep's own command again (same sweep=<name>) to "
                                         f"continue its jobs")
                    _check(job_cfg)
                except VaexpError as err:
                    raise VaexpError(f"{err} (in the sweep job {' '.join(job_overrides)})") from None
            job_dirs = [sweep.job_directory(job_cfg) for _, job_cfg in jobs]
            if None in job_dirs and any(job_cfg.get("stack") for _, job_cfg in jobs):
                raise VaexpError("stack=true: the job directories are named with what only the launcher knows "
                                 "(hydra.job.id); name them by settings or ${hydra.job.num}")
            _check_shared_job_dirs(jobs, job_dirs)
            if str(config.hydra.job.name) == "train":
                _check_job_dirs(jobs, job_dirs)
            elif str(config.hydra.job.name) == "snr":
                _check_snr_job_dirs(jobs, job_dirs)
            _make_sweep_dir(config)
        except Exception as err:  # noqa: BLE001 - see _report_and_exit
            _report_and_exit(err, config)
        if None in job_dirs:  # named by what only the launcher knows: no summary
            return
        # the jobs' sweep directories (sweep=a,b: one each), as `vaexp report` takes them
        self._sweep_dir = " ".join(sorted({str(job_cfg.hydra.sweep.dir) for _, job_cfg in jobs})
                                   or [str(config.hydra.sweep.dir)])
        self._job_dirs = job_dirs
        self._command = str(config.hydra.job.name)
        sweep.stack_plan = None
        if any(job_cfg.get("stack") for _, job_cfg in jobs):
            from vaexp.cli.stacking import StackPlan  # the trainer (torch): only stack=true sweeps need it here

            sweep.stack_plan = StackPlan(jobs, self._job_dirs)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """One summary of the sweep; a non-zero exit when a job failed or did not finish."""
        if not getattr(self, "_job_dirs", None):
            return
        sweep.stack_plan = None
        command = COMMANDS.get(self._command)
        if command is None or not command.writes_run_dir:  # (vaexp eval -m is refused before Hydra runs)
            return
        text, ok = sweep.summary(self._sweep_dir, self._job_dirs, self._command, command.done_file)
        print(text, file=sys.stdout if ok else sys.stderr, flush=True)
        if not ok:
            sys.exit(1)
