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
    """User errors become one line on stderr and exit status 2; an interruption exits 130."""

    def wrapped(cfg: DictConfig):
        from vaexp.train import Interrupted

        try:
            return fn(cfg)
        except VaexpError as err:
            print(f"vaexp: {err}", file=sys.stderr)
            sys.exit(err.exit_code)
        except Interrupted as err:
            print(f"vaexp: {err}", file=sys.stderr)
            sys.exit(130)
        except KeyboardInterrupt:
            print("vaexp: interrupted", file=sys.stderr)
            sys.exit(130)

    wrapped.__name__ = fn.__name__
    return wrapped


def run_train(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig

    from vaexp import rundir
    from vaexp.config import TrainConfig
    from vaexp.evaluate import format_table
    from vaexp.train import train

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    cfg = rundir.prepare(cfg, run_dir, hc.overrides.task, TrainConfig)
    done = rundir.finished(run_dir)
    if done is not None and "test" in done:
        _say(f"vaexp: {run_dir} already finished; its results:\n{format_table(done['test'])}")
        return done
    _say(f"vaexp: run directory {run_dir}")
    summary = train(cfg, run_dir)
    _say(f"vaexp: {cfg.dataset.name} {cfg.model.name} {cfg.objective.name} m={cfg.m} k={cfg.k} "
         f"{cfg.estimator.name}: final train bound {summary['train']['bound']:.3f}\n"
         f"{format_table(summary['test'])}\n  metrics: {run_dir / rundir.METRICS}")
    return summary


def run_eval(cfg: DictConfig):
    import torch

    from vaexp import checkpoint, rundir
    from vaexp.config import TrainConfig
    from vaexp.data import load_dataset
    from vaexp.evaluate import evaluate, format_table
    from vaexp.models import VAE
    from vaexp.train import resolve_device

    run_dir = Path(cfg.run)
    saved = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(run_dir / rundir.CONFIG))
    device = resolve_device(cfg.device)
    data = load_dataset(saved.dataset, device)
    model = VAE.from_config(saved.model, data.train.shape[1]).to(device)
    state = checkpoint.load(run_dir, map_location=device)
    model.load_state_dict(state["model"])
    step = state["state"]["global_step"]
    result = evaluate(model, data.test, cfg.eval, device, progress=cfg.progress)
    rundir.write_metrics(run_dir, {"test": result["metrics"]}, result["per_example"], append_eval=True)
    log = rundir.logger(run_dir)
    log.scalars({f"reeval/{k}": v for k, v in result["metrics"].items() if isinstance(v, (int, float))}, step)
    log.close()
    _say(f"vaexp: {run_dir} (epoch {state['state']['epoch']}, step {step})\n{format_table(result['metrics'])}")
    return result["metrics"]


COMMANDS: Dict[str, Command] = {
    "train": Command("train", run_train),
    "eval": Command("evaluate", run_eval),
}


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


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    register_configs()
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
    if name == "eval" and rest and not rest[0].startswith("-") and ("=" not in rest[0] or os.path.isdir(rest[0])):
        rest = [f"run={_quote(rest[0])}"] + rest[1:]  # `vaexp eval <run dir>`
    sys.argv = [sys.argv[0]] + rest
    _hydra_entry(COMMANDS[name])()


if __name__ == "__main__":
    main()
