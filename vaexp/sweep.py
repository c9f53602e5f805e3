"""Sweeps: the M·K budget, failed jobs that do not stop a sweep, and the end-of-sweep summary.

* ``mk=64 m=1,2,4`` runs the M·K = 64 line: k is derived as mk / m (see :func:`derived_k`).
* In a multirun, a job that fails records ``error.txt`` in its own directory and returns; the
  other jobs run on, and :func:`summary` (called when the sweep ends) lists what failed and
  makes the command exit non-zero. A job that is run again removes its old ``error.txt`` first.
* Every job lives in ``<sweep dir>/<its overrides>``; with ``sweep=<name>`` the sweep directory is
  ``<out_root>/multirun/<name>``, so running the same command again finds the same directories:
  finished jobs are reported, not retrained, and interrupted ones continue from their checkpoint.
"""
from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from vaexp.errors import VaexpError

ERROR_FILE = "error.txt"
METRICS = "metrics.json"


# --------------------------------------------------------------------------- the M·K budget

def divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def override_keys(overrides: Iterable[str]) -> List[str]:
    """Keys of Hydra override strings: 'k=5' -> 'k', '+experiment=x' -> 'experiment'."""
    return [str(o).split("=", 1)[0].lstrip("+~") for o in overrides]


def check_mk(mk: Optional[int], m: int, k: int, k_given: bool) -> Optional[int]:
    """The k that `mk` implies for this m (None when mk is not set); raises VaexpError when m does
    not divide mk, or when k was also given and disagrees."""
    if mk is None:
        return None
    if mk < 1:
        raise VaexpError(f"mk={mk}: must be >= 1; mk is the sample budget M*K, e.g. mk=64")
    if m < 1:
        return None  # validate() reports m itself
    if mk % m:
        raise VaexpError(f"mk={mk} with m={m}: k = mk/m must be a whole number; choose m among the divisors "
                         f"of {mk} ({', '.join(map(str, divisors(mk)))}), or drop mk and give k")
    k_mk = mk // m
    if k_given and k != k_mk:
        raise VaexpError(f"k={k} with mk={mk} m={m}: with mk set, k is derived as mk/m = {k_mk}; "
                         f"drop k={k}, or drop mk={mk} and give m and k yourself")
    return k_mk


def derived_k(k: int, mk: Optional[int], m: int) -> int:
    """k as the run will use it: mk/m when mk is set (and divisible), else k. Used by the
    run-directory name, which is resolved before the checks can run."""
    if mk is None or not m or m < 1 or mk % m:
        return k
    return mk // m


def apply_mk(cfg: Any) -> Any:
    """Set cfg.k = cfg.mk / cfg.m when mk is set (the checks have already run)."""
    mk = cfg.get("mk") if hasattr(cfg, "get") else getattr(cfg, "mk", None)
    if mk is not None:
        cfg.k = derived_k(cfg.k, mk, cfg.m)
    return cfg


# --------------------------------------------------------------------------- jobs of a multirun

def in_multirun() -> bool:
    """True inside a job of `-m` (whatever the launcher: the job's Hydra config says so)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # pragma: no cover - outside Hydra
        return False


def current_job_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

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
        (job_dir / ERROR_FILE).write_text(text)
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


def job_status(job_dir: Path) -> Tuple[str, str]:
    """('finished' | 'failed' | 'unfinished', detail) of one job directory."""
    job_dir = Path(job_dir)
    failed = failure_message(job_dir)
    if failed is not None:
        return "failed", failed
    try:
        metrics = json.loads((job_dir / METRICS).read_text())
        if isinstance(metrics, dict) and "test" in metrics:
            return "finished", ""
    except (OSError, ValueError):
        pass
    return "unfinished", "no metrics.json" if not (job_dir / METRICS).exists() else "metrics.json without test results"


def sweep_jobs(config: Any, config_name: Optional[str]) -> List[Tuple[List[str], Any]]:
    """Every job of a multirun as (overrides, composed config with its hydra node), in the order
    the basic sweeper runs them: hydra.sweeper.params (e.g. from an experiment preset) first,
    then the command line, whose keys win."""
    from hydra import compose
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = config.hydra.sweeper.get("params") if "sweeper" in config.hydra else None
    arguments = [f"{key}={value}" for key, value in (params or {}).items()]
    arguments += list(config.hydra.overrides.task)
    parsed = OverridesParser.create().parse_overrides(arguments)
    jobs = []
    for batch in BasicSweeper.split_arguments(parsed, None):
        for job_overrides in batch:
            jobs.append((list(job_overrides), compose(config_name=config_name, overrides=list(job_overrides),
                                                      return_hydra_config=True)))
    return jobs


def job_directory(sweep_dir: str, job_cfg: Any) -> Path:
    return Path(str(sweep_dir)) / str(job_cfg.hydra.sweep.subdir)


def summary(sweep_dir: Path, job_dirs: Sequence[Path]) -> Tuple[str, bool]:
    """A few lines about the sweep's jobs, and whether all of them finished."""
    sweep_dir = Path(sweep_dir)
    status = [(d, *job_status(d)) for d in job_dirs]
    done = [d for d, s, _ in status if s == "finished"]
    failed = [(d, why) for d, s, why in status if s == "failed"]
    other = [(d, why) for d, s, why in status if s == "unfinished"]
    n = len(status)
    if len(done) == n:
        return (f"vaexp: sweep {sweep_dir}: all {n} jobs finished; tabulate and plot them with: "
                f"vaexp report {sweep_dir}"), True
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
                 "fix the cause and run the same command again (with the same sweep=<name> or hydra.sweep.dir) "
                 "to run only the jobs that did not finish")
    return "\n".join(lines), False


def describe_exception(err: BaseException) -> Tuple[str, str]:
    """(one line, full traceback) for an unexpected error inside a sweep job."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    line = f"{type(err).__name__}: {first}" if first else type(err).__name__
    return line, "".join(traceback.format_exception(type(err), err, err.__traceback__))
