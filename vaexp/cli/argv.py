"""What vaexp does to argv before Hydra parses it.

Invariants: `vaexp eval <dir>` / `vaexp snr <dir>` (one directory, not with run= as well) /
`vaexp report <dir>...` take directories positionally, and an existing directory counts as one
whatever '=' or ',' its name holds (sweep job names do); such a path given as `resume=`/`run=`/
`hydra.run.dir=`/... is quoted for Hydra's grammar (with '=' always, with ',' when it exists);
any other bare '=' in a value is refused with the quoting to use; Hydra's flags may come anywhere
(argparse wants them first); a launcher whose plugin is missing is refused with the extra to
install, SLURM's where srun is missing; a dataset.<key> that the chosen dataset does not have is
refused with the keys it does have (Hydra's own error does not list them), and with
`vaexp snr run=` model=, dataset=, their keys and perturb= (the run fixes them); `--cfg hydra
--resolve` is selected from the whole config (the hydra node interpolates the job's keys).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from hydra.core.override_parser.overrides_parser import OverridesParser

from vaexp.cli.configs import dataset_keys, dataset_options, group_default
from vaexp.rundir.layout import CONFIG

# Launchers that come from optional Hydra plugins: choice -> (plugin module, vaexp extra, PyPI name).
_LAUNCHER_PLUGINS = {
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "joblib", "hydra-joblib-launcher"),
    "parallel": ("hydra_plugins.hydra_joblib_launcher", "joblib", "hydra-joblib-launcher"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "slurm", "hydra-submitit-launcher"),
    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm", "hydra-submitit-launcher"),
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm", "hydra-submitit-launcher"),
}
_SLURM = ("submitit_slurm", "slurm")
# Hydra's flags, with and without a value.
_FLAGS = {"-m", "--multirun", "-h", "--help", "--hydra-help", "--version", "--resolve", "-i", "--info"}
_FLAGS_WITH_VALUE = {"-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name",
                     "-cd", "--config-dir", "--experimental-rerun"}
_PATH_KEYS = ("resume", "run", "dataset.path", "dataset.data_dir", "out_root", "out", "hydra.run.dir",
              "hydra.sweep.dir")


def quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _is_dir_arg(arg: str) -> bool:
    return not arg.startswith("-") and ("=" not in arg or os.path.isdir(arg))


def check_launcher(args: List[str]) -> None:
    """hydra/launcher=<x> whose plugin is missing: say which extra to install (Hydra itself would
    only say that a config is missing). Unknown names are left to Hydra, which lists the options."""
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
            # submitit's SLURM executor needs srun (it fails with a traceback, after Hydra has
            # made the sweep directory); only a sweep (-m) launches.
            if choice in _SLURM and shutil.which("srun") is None and any(a in ("-m", "--multirun") for a in args):
                print(f"vaexp: hydra/launcher={choice} submits the jobs to SLURM, and SLURM's srun is not on this "
                      f"machine's PATH; run the sweep on the cluster's login node, or use hydra/launcher=parallel "
                      f"(the jobs side by side on this machine)", file=sys.stderr)
                sys.exit(2)


def _quote_path_value(arg: str) -> str:
    """A path with '=' (a sweep job's name) is quoted for Hydra's grammar, which allows no '=' in
    a bare value; one with ',' only when it exists (else it may be a sweep, a,b)."""
    key, sep, value = arg.partition("=")
    if sep and key.lstrip("+") in _PATH_KEYS and value and value[0] not in "'\"[{" \
            and ("=" in value or ("," in value and os.path.exists(value))):
        return f"{key}={quote(value)}"
    return arg


def check_bare_equals(args: List[str]) -> None:
    """key=a=b elsewhere: Hydra would only say 'mismatched input'; say how to quote it."""
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and not arg.startswith("-") and "=" in value and value[0] not in "'\"[{" and "${" not in value:
            print(f"vaexp: {arg}: a value holding '=' must be quoted for Hydra: {key}='{value}' "
                  f"(in a shell: \"{key}='{value}'\")", file=sys.stderr)
            sys.exit(2)


def _split_flags(args: List[str]) -> Tuple[List[str], List[str]]:
    """(Hydra's flags with their values, the overrides)."""
    flags, rest, i = [], [], 0
    while i < len(args):
        if args[i] in _FLAGS_WITH_VALUE and i + 1 < len(args):
            flags += args[i:i + 2]
            i += 2
            continue
        (flags if args[i] in _FLAGS else rest).append(args[i])
        i += 1
    return flags, rest


def _choices(overrides, group: str) -> Optional[List[str]]:
    """The options of `group` chosen on the command line (several in a sweep), or None."""
    for o in overrides:
        if o.key_or_group == group and o.package is None and not o.is_delete():
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            return [str(v) for v in values]
    return None


def dataset_choices(config_name: str, overrides) -> List[str]:
    """The dataset option(s) that Hydra will compose: the command line's dataset=, else the
    experiment presets' choice, else the primary config's default ([] when it has no dataset)."""
    chosen = _choices(overrides, "dataset")
    if chosen is not None:
        return chosen
    presets = _choices(overrides, "experiment") or [None]
    found = [(group_default(f"experiment/{p}", "dataset") if p else None) or group_default(config_name, "dataset")
             for p in presets]
    return list(dict.fromkeys(c for c in found if c))


def check_dataset_keys(config_name: str, args: List[str]) -> None:
    """Refuse dataset.<key>=... when <key> is not a setting of the chosen dataset (each dataset
    option carries only its own keys): one line listing the keys that do apply, exit 2."""
    if not any("dataset." in a for a in args):
        return
    try:
        overrides = OverridesParser.create().parse_overrides(args)
        choices = dataset_choices(config_name, overrides)
    except Exception:  # noqa: BLE001 - a syntax error, a glob(...) sweep: Hydra reports or resolves them
        return
    for o in overrides:
        if not o.key_or_group.startswith("dataset.") or o.package is not None or o.is_delete():
            continue
        key = o.key_or_group.split(".")[1]
        for choice in choices:
            keys = dataset_keys(choice)
            if not keys or key in keys:
                continue  # an unknown dataset option is Hydra's to report (it lists the options)
            elsewhere = [opt for opt in dataset_options() if key in dataset_keys(opt)]
            hint = f" ({key} is a setting of dataset={', '.join(elsewhere)})" if elsewhere else ""
            print(f"vaexp: {o.input_line}: dataset={choice} has no setting {key}; its settings are "
                  f"{', '.join(k for k in keys if k != 'name')}{hint}", file=sys.stderr)
            sys.exit(2)


# What run= fixes in `vaexp snr` (vaexp.snr.load_point takes them from the run, not the command):
# the model and the dataset, and perturb, which only moves the analytic model off its optimum.
SNR_RUN_FIXES = ("dataset", "model", "perturb")


def check_snr_run_keys(overrides: List[str]) -> None:
    """`vaexp snr run=<dir>` measures the run's checkpoint on its own model and dataset: model=,
    dataset=, any of their keys, or perturb= would be ignored, so they are refused, here, before
    Hydra would fail on a key that snr's default dataset=gaussian / model=gaussian lacks."""
    run = next(o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "run").strip("'\"")
    keys = [o.split("=", 1)[0].lstrip("+~").split("@", 1)[0] for o in overrides]
    ignored = [o for o, key in zip(overrides, keys) if any(key == k or key.startswith(k + ".") for k in SNR_RUN_FIXES)]
    if not ignored:
        return
    why = []
    if any(key.split(".")[0] in ("model", "dataset") for key in keys):
        why.append(f"snr measures the run's checkpoint on the model and dataset it was trained with"
                   f"{_run_model_and_data(run)}")
    if "perturb" in keys:
        why.append("perturb only moves the analytic model (no run=) off its optimum")
    it = "it" if len(ignored) == 1 else "they"
    print(f"vaexp: {' '.join(ignored)} with run={run}: {', and '.join(why)}, so {it} would be ignored; drop "
          f"{'it' if it == 'it' else 'them'} to measure the run as trained, or omit run= to measure the analytic "
          f"model (model=gaussian dataset=gaussian) instead", file=sys.stderr)
    sys.exit(2)


def _run_model_and_data(run: str) -> str:
    """' (model=<name>, dataset=<name>)' from the run's config.yaml, or '' where it cannot be read
    (vaexp.cli.checks then reports the run itself)."""
    try:
        import yaml

        saved = yaml.safe_load((Path(run) / CONFIG).read_text())
        return f" (model={saved['model']['name']}, dataset={saved['dataset']['name']})"
    except Exception:  # noqa: BLE001 - a missing or damaged run: named by the later checks
        return ""


def named(command: str, positional: str, rest: List[str]) -> List[str]:
    """`rest` with its positional directories as run= (`positional` "run": eval, snr) or dirs=
    ("dirs": report, compare) overrides."""
    rest = list(rest)
    if positional == "run" and rest and _is_dir_arg(rest[0]):
        overrides = _split_flags(rest[1:])[1]
        given = [a for a in overrides if a.split("=", 1)[0].lstrip("+") == "run"]
        more = [a for a in overrides if _is_dir_arg(a)]
        if given or more:  # Hydra would take run= silently, or fail to parse a second path
            other = given[0] if given else more[0]
            print(f"vaexp: {command} takes one run directory, and got {rest[0]} and {other}; give one "
                  f"(vaexp {command} <run dir> or vaexp {command} run=<run dir>)", file=sys.stderr)
            sys.exit(2)
        rest = [f"run={quote(rest[0])}"] + rest[1:]
    if positional == "dirs":
        dirs = []
        while rest and _is_dir_arg(rest[0]):
            dirs.append(rest.pop(0))
        if dirs:
            rest = [f"dirs=[{','.join(quote(d) for d in dirs)}]"] + rest
    return rest


def check_flags(flags: List[str]) -> None:
    """Hydra allows one mode flag; with two it ends in a traceback. Say which to drop."""
    modes = {"-m": "-m", "--multirun": "-m", "-c": "--cfg", "--cfg": "--cfg", "-i": "--info", "--info": "--info"}
    given = list(dict.fromkeys(modes[f] for f in flags if f in modes))
    if len(given) > 1:
        fix = ("--cfg shows one job's config: drop -m and give each swept key one value (e.g. `vaexp train "
               "--cfg job k=5`)" if "-m" in given else f"use one of {' and '.join(given)}")
        print(f"vaexp: {' and '.join(given)} cannot be combined; {fix}", file=sys.stderr)
        sys.exit(2)


def resolvable_cfg(flags: List[str]) -> List[str]:
    """`--cfg hydra --resolve` as `--cfg all --package hydra --resolve`: Hydra resolves its hydra
    node cut off from the job's keys, and vaexp's run and sweep directories interpolate those
    (${out_root}, ${k}, ...), so the plain form fails with a KeyError; selected from the whole
    config, the same node resolves (printed under `# @package hydra`)."""
    out, i = list(flags), 0
    if "--resolve" not in out or "-p" in out or "--package" in out:
        return out
    while i + 1 < len(out):
        if out[i] in ("-c", "--cfg") and out[i + 1] == "hydra":
            return out[:i] + ["--cfg", "all", "--package", "hydra"] + out[i + 2:]
        i += 1
    return out


def hydra_args(command: str, rest: List[str], config_name: Optional[str] = None, positional: str = "") -> List[str]:
    """The arguments Hydra gets for `vaexp <command> <rest>` (conf/<config_name>.yaml: its config;
    `positional`: what its bare directories are, vaexp.cli.commands.Command.positional)."""
    rest = named(command, positional, rest)
    check_flags(_split_flags(rest)[0])
    if command == "eval" and any(f in ("-m", "--multirun") for f in _split_flags(rest)[0]):
        # a sweep's job directories would be made in the working directory, beside the runs evaluated
        print("vaexp: eval -m: vaexp eval evaluates one run, in its own directory; evaluate several one by one "
              "(for d in <run dirs>; do vaexp eval \"$d\"; done)", file=sys.stderr)
        sys.exit(2)
    check_launcher(rest)
    args = [_quote_path_value(a) for a in rest]
    check_bare_equals(args)
    overrides = _split_flags(args)[1]
    if command == "snr" and any(o.split("=", 1)[0] == "run" for o in overrides):
        check_snr_run_keys(overrides)
    elif config_name:
        check_dataset_keys(config_name, overrides)
    flags, overrides = _split_flags(args)  # flags first: `train k=1 -m k=1,2` works like `train -m k=1 k=1,2`
    return resolvable_cfg(flags) + overrides
