"""Multirun jobs: failed jobs that do not stop a sweep, the job list, the end-of-sweep summary.

* In a multirun, a job that fails records ``error.txt`` in its own directory and returns; the
  other jobs run on, and :func:`summary` (called when the sweep ends) lists what failed and
  makes the command exit non-zero. A job that is run again removes its old ``error.txt`` first.
* Every job lives in ``<sweep dir>/<its overrides>``; with ``sweep=<name>`` the sweep directory is
  ``<out_root>/multirun/<name>``, so running the same command again finds the same directories:
  finished jobs are reported, not retrained, and interrupted ones continue from their checkpoint.
"""
from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra import compose
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import OmegaConf

from vaexp import rundir
from vaexp.errors import VaexpError
from vaexp.rundir import ERROR_FILE

# The StackPlan (vaexp.cli.stacking) of the stack=true sweep running in this process, set by the
# multirun callback and read by its jobs: Hydra offers no other channel between the two.
stack_plan: Optional[Any] = None


def in_multirun() -> bool:
    """True inside a job of `-m` (whatever the launcher: the job's Hydra config says so)."""
    try:
        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # pragma: no cover - outside Hydra
        return False


def current_job_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def clear_failure(job_dir: Path) -> None:
    try:
        (Path(job_dir) / ERROR_FILE).unlink(missing_ok=True)
    except OSError:
        pass


def record_failure(job_dir: Path, message: str, details: Optional[str] = None) -> Dict[str, str]:
    """Write <job dir>/error.txt (first line: the message; then the traceback, if any) and return
    the value the job hands back to Hydra (a failed job must not raise: that would stop the sweep)."""
    job_dir = Path(job_dir)
    text = message.strip() + "\n"
    if details:
        text += "\n" + details.rstrip() + "\n"
    text += f"\n(recorded {time.strftime('%Y-%m-%d %H:%M:%S')}; re-run the sweep to retry this job)\n"
    try:
        job_dir.mkdir(parents=True, exist_ok=True)
        rundir.atomic_write_text(job_dir / ERROR_FILE, text)
    except OSError:
        pass
    return {"failed": message.strip(), "dir": str(job_dir)}


def failure_message(job_dir: Path) -> Optional[str]:
    path = Path(job_dir) / ERROR_FILE
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    except OSError:
        return None
    return lines[0] if lines else "failed (empty error.txt)"


def job_status(job_dir: Path, done_file: str = "") -> Tuple[str, str]:
    """('finished' | 'failed' | 'unfinished', detail) of one job directory: finished when it holds
    `done_file` (the command's last write: snr's snr.csv), or without one by vaexp.rundir.judge (train)."""
    job_dir = Path(job_dir)
    failed = failure_message(job_dir)
    if failed is not None:
        return "failed", failed
    if done_file:
        done = (job_dir / done_file).is_file()
        return ("finished", "") if done else ("unfinished", f"no {done_file}")
    metrics, why = rundir.read_metrics(job_dir)
    if why is not None:
        return "unfinished", f"unreadable metrics.json ({why})"
    try:
        epochs = rundir.configured_epochs(rundir.load_config(job_dir))
    except (VaexpError, OSError):
        epochs = None
    state, detail = rundir.judge(metrics, epochs)
    return ("finished", "") if state == "finished" else ("unfinished", detail)


def sweep_jobs(config: Any, config_name: Optional[str]) -> List[Tuple[List[str], Any]]:
    """Every job of a multirun as (overrides, composed config with its hydra node), in the order
    the basic sweeper runs them: hydra.sweeper.params (e.g. from an experiment preset) first,
    then the command line, whose keys win."""
    params = config.hydra.sweeper.get("params") if "sweeper" in config.hydra else None
    arguments = [f"{key}={value}" for key, value in (params or {}).items()]
    arguments += list(config.hydra.overrides.task)
    parsed = OverridesParser.create().parse_overrides(arguments)
    presets = [o for o in parsed if o.key_or_group == "experiment" and o.is_sweep_override()]
    if presets:  # the primary config has no preset, so no grid: each job would run a preset's defaults alone
        raise VaexpError(f"{presets[0].input_line}: a sweep over presets runs none of their grids; run one "
                         f"preset per command (vaexp {config.hydra.job.name} -m experiment=<one>)")
    # The command line's hydra.* overrides (hydra.sweep.subdir=..., a launcher) shape each job, as
    # Hydra's launchers compose it (load_sweep_config): as typed (unresolved: `seed${seed}` is the
    # job's seed), with the job's number, which every launcher sets (${hydra.job.num} in a name).
    raw = OmegaConf.to_container(config.hydra.overrides, resolve=False)
    hydra_overrides = [str(o) for o in raw.get("hydra", [])]
    # Each job gets the master's resolver cache, as load_sweep_config copies it: a ${now:...} in a
    # directory is the launch's time in every job, whenever the job resolves it. The master (the
    # object the sweeper goes on to use) resolves its sweep directory first, so that time is fixed.
    try:
        str(config.hydra.sweep.dir)
    except Exception:  # noqa: BLE001 - an interpolation only the launcher fills: job_directory says None
        pass
    jobs = []
    for batch in BasicSweeper.split_arguments(parsed, None):
        for job_overrides in batch:
            extra = [f"hydra.job.num={len(jobs)}"]
            job_cfg = compose(config_name=config_name, overrides=hydra_overrides + list(job_overrides) + extra,
                              return_hydra_config=True)
            OmegaConf.copy_cache(from_config=config, to_config=job_cfg)
            jobs.append((list(job_overrides), job_cfg))
    return jobs


def job_directory(job_cfg: Any) -> Optional[Path]:
    """Where Hydra runs the job: its own sweep dir (sweep=a,b: one each) and subdir; None where
    the name needs what only the launcher knows (${hydra.job.id}, which launchers write differently)."""
    try:
        return Path(str(job_cfg.hydra.sweep.dir)) / str(job_cfg.hydra.sweep.subdir)
    except Exception:  # noqa: BLE001 - an interpolation vaexp cannot resolve: no summary, no stack plan
        return None


def summary(sweep_dir: Path, job_dirs: Sequence[Path], command: str = "train", done_file: str = ""
            ) -> Tuple[str, bool]:
    """A few lines about the sweep's jobs (of `command`, whose finished jobs hold `done_file`: see
    job_status), and whether all of them finished."""
    sweep_dir = Path(sweep_dir)
    status = [(d, *job_status(d, done_file)) for d in job_dirs]
    done = [d for d, s, _ in status if s == "finished"]
    failed = [(d, why) for d, s, why in status if s == "failed"]
    other = [(d, why) for d, s, why in status if s == "unfinished"]
    n = len(status)
    if len(done) == n:
        return (f"vaexp: sweep {sweep_dir}: all {n} jobs finished" + (f"; tabulate and plot them with: "
                f"vaexp report {sweep_dir}" if command == "train" else "")), True
    lines = [f"vaexp: sweep {sweep_dir}: {len(done)} of {n} jobs finished, {len(failed)} failed"
             + (f", {len(other)} did not finish" if other else "")]

    def rel(d: Path) -> str:
        try:
            return str(Path(d).relative_to(sweep_dir))
        except ValueError:
            return str(d)

    for d, why in failed:
        lines.append(f"  failed: {rel(d)}: {why}")
    for d, why in other:
        lines.append(f"  not finished: {rel(d)} ({why})")
    lines.append(f"  the finished jobs' results are kept{' (a failed job' + chr(39) + 's error.txt holds the details)' if failed else ''}; "
                 + ("fix the cause and run the same command again (with the same sweep=<name> or hydra.sweep.dir) "
                    "to run only the jobs that did not finish" if command == "train" else
                    "fix the cause and run the jobs that did not finish again"))
    return "\n".join(lines), False


def describe_exception(err: BaseException) -> Tuple[str, str]:
    """(one line, full traceback) for an unexpected error inside a sweep job."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    line = f"{type(err).__name__}: {first}" if first else type(err).__name__
    return line, "".join(traceback.format_exception(type(err), err, err.__traceback__))
