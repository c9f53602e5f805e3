"""The schema dataclasses registered with Hydra's ConfigStore, and vaexp's interpolation resolvers.

Invariant: group schemas are stored at the root (``<group>_schema``), not inside the groups, so
``objective=...``, --help and tab completion list only the real options; every group option
starts with ``- /<group>_schema@_here_``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from vaexp.schema import (DatasetConf, EstimatorConf, EvalCommandConfig, EvalConf, ModelConf, ObjectiveConf,
                          ReportConfig, ScheduleConf, SnrConfig, TrainConfig, derived_k)


def _snr_tag(run: Optional[str], dataset: str, model: str) -> str:
    """What `vaexp snr` measures, for its directory name: the run's name, or dataset_model."""
    return Path(str(run)).resolve().name if run else f"{dataset}_{model}"


def _resolver(name: str, fn, **kwargs) -> None:
    if not OmegaConf.has_resolver(name):
        OmegaConf.register_new_resolver(name, fn, **kwargs)


def register_configs() -> None:
    # ${vaexp_or:a,b}: a unless it is null (oc.select only falls back for *missing* keys).
    _resolver("vaexp_or", lambda a, b: b if a is None else a)
    # Hydra's record of a resumed run goes beside the original's, not over it.
    _resolver("vaexp_hydra_subdir",
              lambda resume: ".hydra" if resume is None else f".hydra/resume-{time.strftime('%Y-%m-%d_%H-%M-%S')}",
              use_cache=True)
    _resolver("vaexp_k", derived_k)        # the run directory names the k that mk/m implies
    _resolver("vaexp_snr_tag", _snr_tag)   # the snr run directory names the run it measures
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="evaluate_schema", node=EvalCommandConfig)
    cs.store(name="snr_schema", node=SnrConfig)
    cs.store(name="report_schema", node=ReportConfig)
    for group, node in [("dataset", DatasetConf), ("model", ModelConf), ("objective", ObjectiveConf),
                        ("estimator", EstimatorConf), ("schedule", ScheduleConf), ("eval", EvalConf)]:
        cs.store(name=f"{group}_schema", node=node)
