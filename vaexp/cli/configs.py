"""The schema dataclasses registered with Hydra's ConfigStore, and vaexp's interpolation resolvers.

Invariant: group schemas are stored at the root (``<group>_schema``), not inside the groups, so
``objective=...``, --help and tab completion list only the real options; every group option
starts with ``- /<group>_schema@_here_``, except the datasets: each ``conf/dataset/<option>.yaml``
starts with ``- /dataset_<kind>_schema@_here_`` for one kind of DATASET_SCHEMAS, so its config
holds only the keys that apply to it (:func:`dataset_schema` reads which).
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from importlib import resources
from pathlib import Path
from typing import List, Optional

import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from vaexp.cli.commands import COMMANDS
from vaexp.rundir import HYDRA_DIR, RUNTIME_ONLY, covers, hydra_job, override_keys
from vaexp.schema import (EstimatorConf, EvalConf, FilesConf, GaussianConf, ImagesConf, ModelConf, ObjectiveConf,
                          OmniglotConf, ScheduleConf, SyntheticConf, derived_k)

# The kinds of dataset schema, stored as dataset_<kind>_schema; each dataset option names its kind.
DATASET_SCHEMAS = {"files": FilesConf, "images": ImagesConf, "omniglot": OmniglotConf,
                   "synthetic": SyntheticConf, "gaussian": GaussianConf}


def _config_file(*parts: str):
    return resources.files("vaexp.conf").joinpath(*parts)


def group_default(config_name: str, group: str) -> Optional[str]:
    """The option of `group` that conf/<config_name>.yaml (or an experiment preset, named
    experiment/<x>) chooses in its defaults list; None when it chooses none."""
    path = _config_file(*f"{config_name}.yaml".split("/"))
    if not path.is_file():
        return None
    for entry in (yaml.safe_load(path.read_text()) or {}).get("defaults", []):
        if isinstance(entry, dict):
            for key, value in entry.items():
                if key.replace("override ", "").strip().lstrip("/") == group and isinstance(value, str):
                    return value
    return None


def config_groups() -> List[str]:
    """vaexp's config groups: the folders of conf/ that hold options (Hydra's own hydra/ aside)."""
    return sorted(p.name for p in _config_file().iterdir()
                  if p.is_dir() and p.name != "hydra" and any(q.name.endswith(".yaml") for q in p.iterdir()))


def groups_of(config_name: str) -> List[str]:
    """The config groups that conf/<config_name>.yaml's defaults list composes (hydra/ aside)."""
    path = _config_file(f"{config_name}.yaml")
    groups = []
    for entry in (yaml.safe_load(path.read_text()) or {}).get("defaults", []) if path.is_file() else []:
        for key in (entry if isinstance(entry, dict) else {}):
            name = key.replace("override ", "").strip().lstrip("/")
            if not name.startswith("hydra/"):
                groups.append(name)
    return groups


def dataset_options() -> List[str]:
    """The dataset options, conf/dataset/*.yaml."""
    return sorted(p.name[:-len(".yaml")] for p in _config_file("dataset").iterdir() if p.name.endswith(".yaml"))


def dataset_schema(option: str) -> Optional[type]:
    """The schema dataclass of dataset=<option>, as its yaml names it; None for no such option."""
    path = _config_file("dataset", f"{option}.yaml")
    if not str(option).replace("_", "").isalnum() or not path.is_file():
        return None
    for entry in (yaml.safe_load(path.read_text()) or {}).get("defaults", []):
        if isinstance(entry, str) and entry.startswith("/dataset_") and entry.endswith("_schema@_here_"):
            return DATASET_SCHEMAS.get(entry[len("/dataset_"):-len("_schema@_here_")])
    return None


def dataset_keys(option: str) -> List[str]:
    """The keys of dataset=<option>'s config (empty for no such option)."""
    schema = dataset_schema(option)
    return [f.name for f in dataclasses.fields(schema)] if schema else []


def _snr_tag(run: Optional[str], dataset: str, model: str) -> str:
    """What `vaexp snr` measures, for its directory name: the run's name, or dataset_model."""
    return Path(str(run)).resolve().name if run else f"{dataset}_{model}"


def _snr_job_tag(run: Optional[str], dataset: str, model: str) -> str:
    """A `vaexp snr -m` job's folder for what it measures: the run's name and a hash of its path
    (runs of two sweeps may share a job name), or dataset_model."""
    if not run:
        return f"{dataset}_{model}"
    path = Path(str(run)).resolve()
    return f"{path.name}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


def hydra_subdir(resume, output_dir=None, overrides=None, command=None) -> str:
    """Where Hydra records a train or snr job in its directory (hydra.output_subdir): .hydra,
    unless this is a resume, or the directory's own record is of another command (.hydra/hydra.yaml)
    or other settings (.hydra/overrides.yaml; a sweep over another grid's directories, which a
    sweeper vaexp cannot check up front hands to the job, which refuses): then a folder of its own
    below it, so a directory's record stays that of the command that made it. `overrides`,
    `command`: the command's overrides as typed and its name (default: Hydra's); runtime-only keys
    do not count."""
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    if resume is not None:
        return f".hydra/resume-{stamp}"
    if output_dir is None:
        return ".hydra"
    directory = Path(str(output_dir))
    try:
        if command is None:
            from hydra.core.hydra_config import HydraConfig

            command = str(HydraConfig.get().job.name)
    except Exception:  # noqa: BLE001 - outside a Hydra job: the settings alone decide
        command = None
    if command is not None and hydra_job(directory) not in (None, command):
        return f".hydra/rerun-{stamp}"
    record = directory / HYDRA_DIR / "overrides.yaml"
    if not record.is_file():
        return ".hydra"
    try:
        if overrides is None:
            from hydra.core.hydra_config import HydraConfig

            overrides = OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False)
        recorded = yaml.safe_load(record.read_text())
    except Exception:  # noqa: BLE001 - no record to keep apart from: Hydra's own place
        return ".hydra"

    def settings(items) -> List[str]:
        return sorted(str(o) for o in items or [] if not covers(RUNTIME_ONLY, override_keys([str(o)])[0]))

    return ".hydra" if settings(recorded) == settings(overrides) else f".hydra/rerun-{stamp}"


def _resolver(name: str, fn, **kwargs) -> None:
    if not OmegaConf.has_resolver(name):
        OmegaConf.register_new_resolver(name, fn, **kwargs)


def register_configs() -> None:
    # ${vaexp_or:a,b}: a unless it is null (oc.select only falls back for *missing* keys).
    _resolver("vaexp_or", lambda a, b: b if a is None else a)
    # Hydra's record of a resumed run, or of a command with other overrides in a directory that
    # holds a run (a sweep re-run with other settings, refused by the job), goes beside the
    # original's, not over it.
    _resolver("vaexp_hydra_subdir", hydra_subdir, use_cache=True)
    _resolver("vaexp_k", derived_k)        # the run directory names the k that mk/m implies
    _resolver("vaexp_snr_tag", _snr_tag)   # the snr run directory names the run it measures
    _resolver("vaexp_snr_job", _snr_job_tag)  # ... and an snr sweep job's, uniquely (run= is swept)
    cs = ConfigStore.instance()
    for command in COMMANDS.values():  # conf/<config_name>.yaml's defaults list names <config_name>_schema
        cs.store(name=f"{command.config_name}_schema", node=command.schema)
    for group, node in [("model", ModelConf), ("objective", ObjectiveConf), ("estimator", EstimatorConf),
                        ("schedule", ScheduleConf), ("eval", EvalConf)]:
        cs.store(name=f"{group}_schema", node=node)
    for kind, node in DATASET_SCHEMAS.items():
        cs.store(name=f"dataset_{kind}_schema", node=node)
