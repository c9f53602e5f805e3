"""`vaexp <command> [hydra overrides]`: the first word picks the command, Hydra parses the rest."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from vaexp.config import register_configs
from vaexp.errors import VaexpError

USAGE = """usage: vaexp <command> [-m] [key=value ...]

commands:
  train   train a model, then evaluate test NLL (K=5000) and active units
  eval    re-evaluate a saved run:  vaexp eval <run dir> [eval.k=5000 ...]
  snr     gradient signal-to-noise ratios over an (M, K) grid, per estimator:
          vaexp snr [run=<run dir>] [k=[1,4,16,64] m=[1,4,16] draws=1000 ...]
  report  tables (markdown, CSV) and plots of the runs under sweep/run directories:
          vaexp report outputs/multirun/<sweep> [...] [out=<dir>] [plots=false]

Sweeps: `vaexp train -m objective=miwae mk=64 m=1,2,4,8,16,32,64 sweep=<name>` (k = mk/m);
presets: `vaexp train -m experiment=iwae_table1` (or rainforth_mk64); other launchers:
hydra/launcher=parallel (joblib, local) or hydra/launcher=slurm (submitit).

Every command takes Hydra overrides and flags: `vaexp train --help` lists the config groups and
options, `vaexp train --cfg job` prints the composed config, `vaexp train -m k=1,5,50` sweeps.
Shell completion:  eval "$(vaexp -sc install=bash)"
"""


class Command(NamedTuple):
    config_name: str
    task: Callable[[DictConfig], object]


def _say(msg: str) -> None:
    print(msg, flush=True)


def _guard(fn: Callable[[DictConfig], object]) -> Callable[[DictConfig], object]:
    """User errors become one line on stderr and exit status 2; an interruption exits 130.

    In a multirun (-m) a failing job must not stop the sweep: its error goes to <job dir>/error.txt
    and one line on stderr, the job returns, the others run on, and the sweep's summary at the end
    (vaexp.config.ValidateCallback.on_multirun_end) lists the failures and exits non-zero. Ctrl-C
    still stops the whole sweep (after checkpointing the running job).
    """

    def wrapped(cfg: DictConfig):
        from vaexp import sweep
        from vaexp.train import Interrupted

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
            print(f"vaexp: job {job_dir} failed: {line} (traceback in {job_dir / sweep.ERROR_FILE})",
                  file=sys.stderr, flush=True)
            return sweep.record_failure(job_dir, line, details)

    wrapped.__name__ = fn.__name__
    return wrapped


def run_train(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig

    from vaexp import rundir
    from vaexp.config import TrainConfig
    from vaexp.evaluate import format_table
    from vaexp.sweep import apply_mk
    from vaexp.train import train

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    fresh = not (run_dir / rundir.CONFIG).exists()
    cfg = rundir.prepare(apply_mk(cfg), run_dir, hc.overrides.task, TrainConfig)
    if cfg.get("stack"):  # -m stack=true: this job may be (or lead) a stack of compatible jobs
        from vaexp.stack import sweep_job

        stacked = sweep_job(run_dir, _say)
        if stacked is not None:
            return stacked
    done = rundir.finished(run_dir)
    if done is not None and "test" in done and not rundir.more_epochs(cfg, run_dir):
        _say(f"vaexp: {run_dir} already finished; its results:\n{format_table(done['test'])}")
        return done
    _say(f"vaexp: run directory {run_dir}")
    try:
        summary = train(cfg, run_dir)
    except VaexpError:
        from vaexp.sweep import in_multirun

        if fresh and not in_multirun():  # e.g. no data: leave no half-made run directory behind
            rundir.remove_unstarted(run_dir)
        raise
    _say(f"vaexp: {cfg.dataset.name} {cfg.model.name} {cfg.objective.name} m={cfg.m} k={cfg.k} "
         f"{cfg.estimator.name}: final train bound {summary['train']['bound']:.3f}\n"
         f"{format_table(summary['test'])}\n  metrics: {run_dir / rundir.METRICS}")
    return summary


def _eval_settings(cfg: DictConfig, saved: DictConfig) -> DictConfig:
    """The run's own eval settings, with the eval.* given on this command line on top: by default
    `vaexp eval` repeats the evaluation the run was trained with."""
    from hydra.core.hydra_config import HydraConfig

    settings = saved.eval.copy()
    for override in HydraConfig.get().overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith("eval."):
            OmegaConf.update(settings, key[len("eval."):], OmegaConf.select(cfg, key), merge=False)
    return settings


def run_eval(cfg: DictConfig):
    from vaexp import checkpoint, rundir
    from vaexp.config import TrainConfig
    from vaexp.data import load_dataset
    from vaexp.evaluate import evaluate, format_table
    from vaexp.models import build_model
    from vaexp.train import resolve_device

    run_dir = Path(cfg.run)
    saved = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(run_dir / rundir.CONFIG))
    device = resolve_device(cfg.device)
    data = load_dataset(saved.dataset, device)
    model = build_model(saved.model, data).to(device)
    state = checkpoint.load(run_dir, map_location=device)
    model.load_state_dict(state["model"])
    step = state["state"]["global_step"]
    result = evaluate(model, data.test, _eval_settings(cfg, saved), device, progress=cfg.progress)
    rundir.write_metrics(run_dir, {"test": result["metrics"]}, result["per_example"], append_eval=True)
    log = rundir.logger(run_dir)
    log.scalars({f"reeval/{k}": v for k, v in result["metrics"].items() if isinstance(v, (int, float))}, step)
    log.close()
    _say(f"vaexp: {run_dir} (epoch {state['state']['epoch']}, step {step})\n{format_table(result['metrics'])}")
    return result["metrics"]


def run_snr(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig

    from vaexp.snr import snr

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    _say(f"vaexp: snr output directory {out_dir}")
    result = snr(cfg, out_dir)
    _say(f"{result['table']}\n  written: {out_dir}/snr.csv, snr.png, snr.txt, TensorBoard events")
    return result


def run_report(cfg: DictConfig):
    from vaexp.report import report

    return report(list(cfg.dirs), out=cfg.out, plots=cfg.plots, curves=cfg.curves)


COMMANDS: Dict[str, Command] = {
    "train": Command("train", run_train),
    "eval": Command("evaluate", run_eval),
    "snr": Command("snr", run_snr),
    "report": Command("report", run_report),
}

# Launchers that come from optional Hydra plugins: choice -> (plugin module, vaexp extra, PyPI name).
_LAUNCHER_PLUGINS = {
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "joblib", "hydra-joblib-launcher"),
    "parallel": ("hydra_plugins.hydra_joblib_launcher", "joblib", "hydra-joblib-launcher"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "slurm", "hydra-submitit-launcher"),
    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm", "hydra-submitit-launcher"),
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm", "hydra-submitit-launcher"),
}


def _check_launcher(args: List[str]) -> None:
    """hydra/launcher=<x> whose plugin is missing: say which extra to install (Hydra itself would
    only say that a config is missing). Unknown names are left to Hydra, which lists the options."""
    import importlib.util

    for arg in args:
        if arg.startswith("hydra/launcher="):
            choice = arg.split("=", 1)[1]
            if choice not in _LAUNCHER_PLUGINS:
                continue
            module, extra, package = _LAUNCHER_PLUGINS[choice]
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                print(f"vaexp: hydra/launcher={choice} needs Hydra's {package} plugin, which is not installed; "
                      f"pip install \"vaexp[{extra}]\" (or pip install {package})", file=sys.stderr)
                sys.exit(2)


def _report_dirs(rest: List[str]) -> List[str]:
    """`vaexp report <dir>... [key=value ...]`: the leading directories become dirs=[...]. Sweep job
    directories have '=' and ',' in their names, so an existing directory is a directory whatever
    its name."""
    dirs = []
    while rest and not rest[0].startswith("-") and ("=" not in rest[0] or os.path.isdir(rest[0])):
        dirs.append(rest.pop(0))
    if dirs:
        rest = [f"dirs=[{','.join(_quote(d) for d in dirs)}]"] + rest
    return rest


def _hydra_entry(command: Command) -> Callable[[], None]:
    return hydra.main(config_path="pkg://vaexp.conf", config_name=command.config_name,
                      version_base="1.3")(_guard(command.task))


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _completion(argv: List[str]) -> None:
    """`vaexp -sc ...`: Hydra's bash completion calls the program without the command word."""
    flag = argv.index("-sc") if "-sc" in argv else argv.index("--shell-completion")
    value = argv[flag + 1] if flag + 1 < len(argv) else ""
    command = COMMANDS["train"]
    if value.startswith("query"):
        line = os.environ.get("COMP_LINE", "")
        words = line.split()
        if len(words) < 2 or (len(words) == 2 and not line.endswith(" ")):
            prefix = words[1] if len(words) == 2 else ""
            print(" ".join(c for c in COMMANDS if c.startswith(prefix)))
            return
        if words[1] not in COMMANDS:
            return
        command = COMMANDS[words[1]]
        os.environ["COMP_LINE"] = " ".join([words[0]] + words[2:]) + (" " if line.endswith(" ") else "")
    sys.argv = [sys.argv[0], "-sc", value]
    _hydra_entry(command)()


def tune_cpu_allocator() -> bool:
    """glibc only: serve big allocations from the heap and keep freed memory in the process
    (mallopt M_MMAP_THRESHOLD 1 GiB, M_TRIM_THRESHOLD 2 GiB) instead of mmap-ing and unmapping
    every CPU temporary above 32 MiB, each of which is page-faulted in again on first touch: on a
    2-core VM that made the K=5000 evaluation ~1.8x slower, and a stacked M·K=64 step ~1.4x. The
    cost: the process keeps its peak memory (as CUDA's caching allocator does).
    VAEXP_MALLOC_TUNING=0 leaves the allocator alone. Returns whether it was applied."""
    if os.environ.get("VAEXP_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, (1 << 31) - 1))
    except (OSError, AttributeError):  # not glibc
        return False


# Hydra's flags, with and without a value. argparse wants them before the overrides.
_FLAGS = {"-m", "--multirun", "-h", "--help", "--hydra-help", "--version", "--resolve", "-i", "--info"}
_FLAGS_WITH_VALUE = {"-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name",
                     "-cd", "--config-dir", "--experimental-rerun"}


_PATH_KEYS = ("resume", "run", "dataset.path", "dataset.data_dir", "out_root")


def _quote_path_value(arg: str) -> str:
    """`resume=outputs/multirun/x/k=1,m=2`: sweep job directories have '=' and ',' in their
    names, which Hydra's override grammar would parse; quote such a value when it is a path."""
    key, sep, value = arg.partition("=")
    if sep and key in _PATH_KEYS and value and value[0] not in "'\"" and ("=" in value or "," in value) \
            and os.path.exists(value):
        return f"{key}={_quote(value)}"
    return arg


def _flags_first(args: List[str]) -> List[str]:
    """`vaexp train k=1 -m k=1,2` works like `vaexp train -m k=1 k=1,2`."""
    flags, rest, i = [], [], 0
    while i < len(args):
        if args[i] in _FLAGS_WITH_VALUE and i + 1 < len(args):
            flags += args[i:i + 2]
            i += 2
            continue
        (flags if args[i] in _FLAGS else rest).append(args[i])
        i += 1
    return flags + rest


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    register_configs()
    tune_cpu_allocator()
    if "-sc" in argv[:1] or "--shell-completion" in argv[:1]:
        return _completion(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"vaexp: unknown command {name!r}; commands: {', '.join(COMMANDS)} (vaexp --help)", file=sys.stderr)
        sys.exit(2)
    # `vaexp eval <run dir>`: multirun directory names contain '=' themselves, so an existing
    # directory counts as the run whatever its name.
    if name in ("eval", "snr") and rest and not rest[0].startswith("-") and ("=" not in rest[0] or os.path.isdir(rest[0])):
        rest = [f"run={_quote(rest[0])}"] + rest[1:]  # `vaexp eval <run dir>`, `vaexp snr <run dir>`
    if name == "report":
        rest = _report_dirs(list(rest))
    _check_launcher(rest)
    rest = [_quote_path_value(a) for a in rest]
    sys.argv = [sys.argv[0]] + _flags_first(rest)
    _hydra_entry(COMMANDS[name])()


if __name__ == "__main__":
    main()
