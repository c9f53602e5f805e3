"""`vaexp <command> [hydra overrides]`: the first word picks the command, Hydra parses the rest.

This package is the only one that uses Hydra's application machinery: argv handling (argv.py),
completion (completion.py), Hydra's config errors as one line (hydra_errors.py), the commands
(commands.py, whose COMMANDS table is the one list of them and of their facts), the checks
(checks.py), the callback
that runs them before any directory exists (callback.py), multirun jobs (sweep.py) and the
stacks of a stack=true sweep (stacking.py). Every computing job runs after
vaexp.runtime.setup in its own process (:func:`with_runtime`).
"""
from __future__ import annotations

import functools
import signal
import sys
import threading
import warnings
from typing import Callable, List, Optional, Tuple

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from vaexp import runtime
from vaexp.cli.argv import hydra_args
from vaexp.cli.commands import COMMANDS, hydra_entry, raise_terminated
from vaexp.cli.completion import complete
from vaexp.cli.configs import register_configs
from vaexp.cli.hydra_errors import exit_with_line, route_hydra_errors
from vaexp.errors import debugging, fault_line
from vaexp.rundir import abandon_all

USAGE = """usage: vaexp <command> [-m] [key=value ...]

commands:
  train   train a model, then evaluate test NLL (K=5000) and active units
  eval    re-evaluate a saved run:  vaexp eval <run dir> [eval.k=5000 ...]
  snr     gradient signal-to-noise ratios over an (M, K) grid, per estimator:
          vaexp snr [run=<run dir>] [k=[1,4,16,64] m=[1,4,16] draws=1000 ...]
  report  tables (markdown, CSV) and plots of the runs under sweep/run directories:
          vaexp report outputs/multirun/<sweep> [...] [out=<dir>] [plots=false]
  compare paired per-image comparisons (mean, SE, 95% interval, t-test) of the finished runs:
          vaexp compare outputs/multirun/<sweep> [more dirs] [out=<dir>]

Sweeps: `vaexp train -m objective=miwae mk=64 m=1,2,4,8,16,32,64 sweep=<name>` (k = mk/m);
presets: `vaexp train -m experiment=iwae_table1` (or rainforth_mk64); other launchers:
hydra/launcher=parallel (joblib, local) or hydra/launcher=slurm (submitit).

Every command takes Hydra overrides and flags: `vaexp train --help` lists the config groups and
options, `vaexp train --cfg job` prints the composed config, `vaexp train -m k=1,5,50` sweeps.
Shell completion:  eval "$(vaexp -sc install=bash)"
"""


def parallel_jobs() -> Tuple[int, Optional[int]]:
    """(jobs running at once, this job's number) in this Hydra job: a joblib sweep's n_jobs
    (-1: one per core, as joblib counts), else 1."""
    try:
        hc = HydraConfig.get()
    except ValueError:  # not inside a Hydra job
        return 1, None
    if hc.mode != RunMode.MULTIRUN:
        return 1, None
    n = hc.launcher.get("n_jobs") if "launcher" in hc else None
    if not isinstance(n, int) or n == 0:
        return 1, hc.job.get("num")
    return (n if n > 0 else max(1, runtime.cores() + 1 + n)), hc.job.get("num")


def with_runtime(task: Callable) -> Callable:
    """The command, after vaexp.runtime.setup in the job's own process (a joblib worker too) for
    the commands that compute (their configs have a device; `vaexp report` stays torch-free)."""

    @functools.wraps(task)
    def run(cfg):
        if "device" in cfg:
            jobs, num = parallel_jobs()
            runtime.setup(jobs=jobs)
            runtime.assign_gpu(jobs, num, cfg.device)
        return task(cfg)

    return run


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    register_configs()
    runtime.tune_cpu_allocator()
    if "-sc" in argv[:1] or "--shell-completion" in argv[:1]:
        return complete(argv)
    if not argv:
        print(USAGE, end="", file=sys.stderr)
        print("vaexp: no command given; choose one of: " + ", ".join(COMMANDS), file=sys.stderr)
        sys.exit(2)
    if argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return
    name, rest = argv[0], argv[1:]
    problem = runtime.env_problem()
    if problem is not None:
        print(f"vaexp: {problem}", file=sys.stderr)
        sys.exit(2)
    if name not in COMMANDS:
        print(f"vaexp: unknown command {name!r}; commands: {', '.join(COMMANDS)} (vaexp --help)", file=sys.stderr)
        sys.exit(2)
    command = COMMANDS[name]
    sys.argv = [sys.argv[0]] + hydra_args(name, rest, command.config_name, command.positional)
    old_hook = threading.excepthook
    threading.excepthook = _thread_fault
    undo = route_hydra_errors(name)
    old_format = warnings.formatwarning
    warnings.formatwarning = _warning_line
    # SIGTERM as Ctrl-C from here on, not only inside the command: a run directory the callback
    # made before the command started is then removed too (Python's default would just exit).
    old_term = signal.signal(signal.SIGTERM, raise_terminated) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        hydra_entry(command._replace(task=with_runtime(command.task)))()
    except KeyboardInterrupt as err:  # before the command's own boundary (inside Hydra's start-up)
        line, code = fault_line(err)
        print(f"vaexp: {line}", file=sys.stderr)
        sys.exit(code)
    except Exception as err:  # noqa: BLE001 - what Hydra raises outside run_and_report (--help's composition)
        if debugging():
            raise
        exit_with_line(err, name)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        warnings.formatwarning = old_format
        undo()
        threading.excepthook = old_hook
        abandon_all()  # a run directory taken by the callback but never handed to the command


_python_format = warnings.formatwarning


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """vaexp's own warnings ("vaexp: ...") as the one line they are, without Python's file, line
    number and source line; other libraries' warnings as Python shows them."""
    text = str(message)
    if text.startswith("vaexp:"):
        return text + "\n"
    return _python_format(message, category, filename, lineno, line)


def _thread_fault(args) -> None:
    """A background thread's fault (TensorBoard's event writer on a full disk) as one line. An
    OSError is left to the main thread, to which TensorBoard re-raises it at its next write."""
    if debugging():
        threading.__excepthook__(args)
    elif not isinstance(args.exc_value, OSError):
        print(f"vaexp: warning: in thread {args.thread.name if args.thread else '?'}: "
              f"{fault_line(args.exc_value)[0]}", file=sys.stderr, flush=True)
