"""`vaexp train -m stack=true ...`: which jobs of a sweep train together as one stack.

The multirun callback (on_multirun_start) makes a :class:`StackPlan` of the sweep's jobs and
keeps it in vaexp.cli.sweep.stack_plan; Hydra's basic launcher then runs the jobs one by one in
this same process, and each job asks the plan for its result: the first job of a group locks and
checks every member's run directory, trains the whole group (vaexp.training.loop.train_stacked),
and every job of the group reports its own result, or raises its own error. Hydra offers no
other channel from the callback to the jobs, hence the one process-wide holder. Other launchers
run jobs in other processes: there the plan is empty and every job trains alone. Invariant: a
job is planned into a group only with jobs of the same stack key at the same checkpoint
position; finished jobs are left out.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from omegaconf import OmegaConf

from vaexp import rundir
from vaexp.cli.checks import validate_train_dir
from vaexp.errors import VaexpError
from vaexp.evaluate import format_table
from vaexp.schema import apply_mk
from vaexp.training.loop import train_stacked
from vaexp.training.step import stack_key


@dataclass
class PlannedJob:
    cfg: Any             # the job's task config (k derived from mk)
    run_dir: Path
    overrides: List[str]
    num: int             # its hydra.job.num: the one job that trains this directory


@dataclass
class PlannedStack:
    jobs: List[PlannedJob]
    attempted: bool = False
    results: Dict[str, Any] = field(default_factory=dict)  # run dir -> summary or error
    leader: str = ""     # the run dir of the job that trained the stack


def _dir_key(path) -> str:
    return os.path.abspath(str(path))


class StackPlan:
    """The sweep's stacks, by run directory."""

    def __init__(self, jobs: Sequence, job_dirs: Sequence[Path]):
        """`jobs`: (overrides, composed config with its hydra node) per job, in sweep order."""
        self.by_dir: Dict[str, PlannedStack] = {}
        self.job_of: Dict[str, int] = {}
        groups: Dict[tuple, List[PlannedJob]] = {}
        planned = set()
        for num, ((overrides, job_cfg), job_dir) in enumerate(zip(jobs, job_dirs)):
            if not job_cfg.get("stack") or _dir_key(job_dir) in planned:
                continue  # a later job in a planned directory (it differs in runtime-only settings): finds it done
            planned.add(_dir_key(job_dir))
            task = apply_mk(OmegaConf.masked_copy(job_cfg, [key for key in job_cfg.keys() if key != "hydra"]))
            key = stack_key(task)
            if key is None:
                continue
            try:
                if rundir.finished_metrics(job_dir, task) is not None:
                    continue
                saved = rundir.load_checkpoint(job_dir)
            except VaexpError:
                continue  # a damaged run: it fails alone, with its own message
            at = (saved["state"]["epoch"], saved["state"]["step"]) if saved is not None else (0, 0)
            groups.setdefault((key, at), []).append(PlannedJob(task, Path(job_dir), list(overrides), num))
        positions: Dict[str, List[tuple]] = {}
        for key, at in groups:
            positions.setdefault(key, []).append(at)
        for key, ats in positions.items():
            if len(ats) > 1:  # jobs added to an interrupted sweep, a run stopped alone, a stack killed mid-write
                where = "; ".join(f"epoch {e} step {s}: " + ", ".join(j.run_dir.name for j in groups[(key, (e, s))])
                                  for e, s in sorted(ats))
                warnings.warn(f"vaexp: runs of one stack shape are at different positions ({where}): they "
                              f"train in one stack per position (runs once stacked together then round "
                              f"differently from one stack: their results agree to float rounding, not bit for "
                              f"bit)", RuntimeWarning, stacklevel=2)
        for members in groups.values():
            if len(members) > 1:
                group = PlannedStack(members)
                for job in members:
                    self.by_dir[_dir_key(job.run_dir)] = group
                    self.job_of[_dir_key(job.run_dir)] = job.num

    def result(self, run_dir: Path, say: Callable[[str], None], stop=None, num: Optional[int] = None
               ) -> Optional[Dict]:
        """This job's (hydra.job.num `num`) result when it belongs to a stack (training the stack
        first when this is its first job to run), or None: train it alone as usual."""
        me = _dir_key(run_dir)
        group = self.by_dir.get(me)
        if group is None or (num is not None and self.job_of[me] != num):
            return None
        if not group.attempted:
            group.attempted = True
            ready: List[PlannedJob] = []
            taken: List[rundir.Transaction] = []  # the other members' holds, this job's own is its command's
            with contextlib.ExitStack() as held:  # every member's directory locked while the stack trains
                try:
                    for job in group.jobs:
                        try:
                            tx = held.enter_context(rundir.begin(job.run_dir))
                            if _dir_key(job.run_dir) != me:
                                taken.append(tx)
                            job.cfg = validate_train_dir(job.cfg, job.run_dir, job.overrides)
                            ready.append(job)
                        except (VaexpError, OSError) as err:
                            group.results[_dir_key(job.run_dir)] = err
                    if len(ready) > 1:
                        say(f"vaexp: training {len(ready)} runs as one stacked model:\n" +
                            "\n".join(f"  {job.run_dir}" for job in ready))
                        group.leader = _dir_key(ready[0].run_dir)
                        results = train_stacked([job.cfg for job in ready], [job.run_dir for job in ready], stop)
                        for job, result in zip(ready, results):
                            group.results[_dir_key(job.run_dir)] = result
                except BaseException:  # Ctrl-C, or the stack failed as a whole: what it made for the others goes
                    for tx in taken:   # (a member that holds a checkpoint keeps it; see Transaction.rollback)
                        tx.rollback()
                    raise
        if me not in group.results:
            return None  # the stack did not run (a single compatible job left, or it failed): train alone
        result = group.results[me]
        if isinstance(result, BaseException):
            raise result
        leader = group.leader
        if me == leader:
            say(f"vaexp: {run_dir}: {rundir.final_train(result['train'])} (trained stacked)\n"
                f"{format_table(result['test'])}\n  metrics: {Path(run_dir) / rundir.METRICS}")
        else:
            say(f"vaexp: {run_dir} was trained in a stack with {Path(leader).name}; its results:\n"
                f"{format_table(result['test'])}")
        return result
