"""Range and combination checks of a composed config: what a type cannot say.

Invariants: every check runs from the Hydra callback (vaexp.cli.callback) *before* Hydra creates
a directory (validate_train_dir, which reads an existing run directory, runs under its lock),
raises VaexpError with ``<setting>: <problem>; <fix>``, and reads the names it accepts from the
registries (vaexp.objectives.OBJECTIVES, vaexp.estimators.ESTIMATORS, vaexp.data.DATASETS,
vaexp.models.burda.ACTIVATIONS), never from a list of its own. Numbers that reach torch are
checked for NaN and range here (seeds: 0 <= seed < 2^63).
"""
from __future__ import annotations

import copy
import math
import os
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from vaexp import rundir
from vaexp.data import DATASETS
from vaexp.errors import VaexpError
from vaexp.estimators import ESTIMATORS, get_estimator, undefined_because
from vaexp.models.burda import ACTIVATIONS
from vaexp.objectives import OBJECTIVES, make_objective
from vaexp.schema import BURDA_MODEL_ONLY, GAUSSIAN_MODEL_ONLY, ModelConf, TrainConfig, apply_mk, check_mk
from vaexp.training import capture


def _fail(setting: str, problem: str, fix: str) -> None:
    raise VaexpError(f"{setting}: {problem}; {fix}")


def cuda_available() -> bool:
    return torch.cuda.is_available()


SEED_LIMIT = 2 ** 63
MAX_EPOCHS = 10 ** 7
# Sample rows one step, draw block or gradient draw computes at once: 2^31 rows of even one
# latent unit are 8 GiB of ε alone, and well past it torch's size arithmetic overflows int64 (a
# "bug" line, not a refusal). A count under it that still does not fit gets the memory message.
MAX_ROWS = 2 ** 31


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def validate_seed(setting: str, value: Any, limit: int = SEED_LIMIT) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < limit:
        _fail(f"{setting}={value}", f"a seed must be an integer in [0, 2^{limit.bit_length() - 1} - 1]",
              f"use e.g. {setting}=0")


def validate_rows(setting: str, rows: int, fix: str) -> None:
    if rows >= MAX_ROWS:
        _fail(setting, f"{rows:,} sample rows at once, more than any device holds (the limit is 2^31)", fix)


def validate_dataset_seeds(dataset: Any) -> None:
    """The seeds the chosen dataset has (each dataset option carries only its own keys)."""
    for key, limit in (("binarize_seed", SEED_LIMIT), ("seed", SEED_LIMIT), ("shuffle_seed", 2 ** 32)):  # 2^32: numpy's RandomState
        if key in dataset and dataset[key] is not None:
            validate_seed(f"dataset.{key}", dataset[key], limit)


def _stages_length(s: Any) -> int:
    """Epochs of all stages before the schedule.epochs cap (vaexp.schedule builds them all), counted
    without building a list that may not fit in memory."""
    total = 0
    for i in range(s.stages):
        total += s.stage_epochs if s.stage_epochs is not None else s.epochs_base ** i
        if total > MAX_EPOCHS:
            break
    return total


def validate_eval(ev: Any, prefix: str = "eval") -> None:
    if ev.k < 1:
        _fail(f"{prefix}.k={ev.k}", "must be >= 1", f"use e.g. {prefix}.k=5000")
    for kk in ev.report_k:  # values >= k are simply not reported (L_k is the NLL estimate itself)
        if kk < 1:
            _fail(f"{prefix}.report_k", f"{kk} is not a sample count", "use values >= 1, e.g. [1,64]")
    if ev.chunk < 0:
        _fail(f"{prefix}.chunk={ev.chunk}", "must be >= 0", "use 0 to size chunks from free memory")
    validate_rows(f"{prefix}.k={ev.k}", ev.k, f"lower {prefix}.k (Burda et al. use 5000)")
    validate_rows(f"{prefix}.chunk={ev.chunk} {prefix}.k={ev.k}", ev.chunk * ev.k,
                  f"lower {prefix}.chunk (images per draw block; 0 sizes blocks automatically)")
    if ev.n_test is not None and ev.n_test < 2:
        _fail(f"{prefix}.n_test={ev.n_test}", "must be >= 2 (active units are a variance over the test images)",
              "or null for the whole test set")
    if ev.every < 0:
        _fail(f"{prefix}.every={ev.every}", "must be >= 0", "use 0 to evaluate only at the end")
    validate_seed(f"{prefix}.seed", ev.seed)
    if not (_finite(ev.au_threshold) and ev.au_threshold >= 0):
        _fail(f"{prefix}.au_threshold={ev.au_threshold}", "must be a finite number >= 0 (a unit is active when the "
              "variance of its posterior mean exceeds it)", f"use e.g. {prefix}.au_threshold=0.01 (Burda et al.)")
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
    validate_rows(f"m={cfg.m} k={cfg.k} batch_size={cfg.batch_size}", cfg.m * cfg.k * cfg.batch_size,
                  "lower k, m or batch_size (a step computes m*k samples of each of batch_size images)")
    validate_seed("seed", cfg.seed)
    validate_dataset_seeds(cfg.dataset)
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
    validate_objective_k(obj, [cfg.k])
    validate_estimator(cfg.estimator, obj, cfg.k, cfg.beta)
    validate_diagnostics(cfg.diagnostics, cfg.estimator.name, obj, cfg.k, cfg.beta, cfg.dataset)
    if cfg.dataset.name not in DATASETS:
        _fail(f"dataset.name={cfg.dataset.name}", "unknown dataset", f"choose one of {', '.join(DATASETS)}")
    if cfg.dataset.n_valid < 0:
        _fail(f"dataset.n_valid={cfg.dataset.n_valid}", "must be >= 0", "use e.g. dataset.n_valid=400")
    if cfg.dataset.name == "synthetic":
        for key, low in (("n_train", 1), ("n_test", 2)):
            if cfg.dataset[key] < low:
                _fail(f"dataset.{key}={cfg.dataset[key]}", f"must be >= {low}", f"use e.g. dataset.{key}=500")
        if cfg.dataset.n_valid >= cfg.dataset.n_train:
            _fail(f"dataset.n_valid={cfg.dataset.n_valid}", f"must be smaller than dataset.n_train={cfg.dataset.n_train}",
                  "lower dataset.n_valid")
    validate_model_keys(cfg.model)
    validate_model_and_data(cfg.model, cfg.dataset)
    s = cfg.schedule
    if not (_finite(s.lr) and s.lr > 0):
        _fail(f"schedule.lr={s.lr}", "must be a finite number > 0", "use e.g. schedule.lr=1e-3")
    if not (_finite(s.lr_decay) and s.lr_decay > 0):
        _fail(f"schedule.lr_decay={s.lr_decay}", "must be a finite number > 0", "use e.g. schedule.lr_decay=0.72")
    if s.stages < 1:
        _fail(f"schedule.stages={s.stages}", "must be >= 1", "use e.g. schedule.stages=8")
    if s.epochs_base < 1:
        _fail(f"schedule.epochs_base={s.epochs_base}", "must be >= 1", "use e.g. schedule.epochs_base=3")
    if s.stage_epochs is not None and s.stage_epochs < 1:
        _fail(f"schedule.stage_epochs={s.stage_epochs}", "must be >= 1", "or null for epochs_base**i")
    if s.epochs is not None and s.epochs < 1:
        _fail(f"schedule.epochs={s.epochs}", "must be >= 1", "or null for the whole schedule")
    if _stages_length(s) > MAX_EPOCHS or (s.epochs or 0) > MAX_EPOCHS:
        given = f"schedule.stages={s.stages} " + (f"schedule.stage_epochs={s.stage_epochs}" if s.stage_epochs
                                                  else f"schedule.epochs_base={s.epochs_base}")
        _fail(given if (s.epochs or 0) <= MAX_EPOCHS else f"schedule.epochs={s.epochs}",
              f"the schedule has more than {MAX_EPOCHS:,} epochs", "lower schedule.stages, schedule.stage_epochs "
              "or schedule.epochs_base (schedule.epochs caps the total, but the stages must fit first)")
    for key in ("beta1", "beta2"):
        if not (_finite(s[key]) and 0 <= s[key] < 1):
            _fail(f"schedule.{key}={s[key]}", "Adam needs 0 <= beta < 1", f"use e.g. schedule={s.name} (the defaults)")
    if not (_finite(s.eps) and s.eps > 0):
        _fail(f"schedule.eps={s.eps}", "Adam needs a finite eps > 0", "use e.g. schedule.eps=1e-4 (Burda et al.)")
    validate_eval(cfg.eval)
    validate_device(cfg.device)
    validate_fast(cfg.get("fast", "auto"), cfg.device)


def validate_objective_k(obj: str, ks) -> None:
    if obj == "jvi" and min(ks) < 2:
        _fail("objective=jvi with k=1", "the jackknife has no leave-one-out term with one sample (with k=1 "
              "jvi is the ELBO)", "use k >= 2, or objective=vae for the ELBO")


def _check_combination(setting: str, est_name: str, obj: str, k: int, beta: float, alpha=None) -> None:
    """The estimator's own word on this objective and k (vaexp.estimators.undefined_because)."""
    why = undefined_because(get_estimator(est_name, alpha), make_objective(obj, beta), k)
    if why is not None:
        problem, _, fix = why.rpartition("; ")
        _fail(f"{setting} with objective={obj} k={k}", problem, fix)


def validate_estimator(est: Any, obj: str, k: int, beta: float) -> None:
    alpha = est.get("alpha")
    if est.name == "gdreg":
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            _fail(f"estimator.alpha={alpha}", "must lie in [0, 1]",
                  "gdreg is (1-alpha)*dreg + alpha*rws_dreg, e.g. estimator.alpha=0.5")
    elif alpha is not None:
        _fail(f"estimator.alpha={alpha} with estimator={est.name}", "only gdreg has an alpha",
              "use estimator=gdreg estimator.alpha=..., or drop estimator.alpha")
    _check_combination(f"estimator={est.name}", est.name, obj, k, beta, alpha)


def validate_diagnostics(diag: Any, own: str, obj: str, k: int, beta: float, dataset: Any) -> None:
    if diag.every is None:
        return
    if diag.every < 1:
        _fail(f"diagnostics.every={diag.every}", "must be >= 1", "use e.g. diagnostics.every=1000, or null for off")
    if diag.draws < 2:
        _fail(f"diagnostics.draws={diag.draws}", "a variance needs at least 2 gradient draws",
              "use e.g. diagnostics.draws=100")
    if diag.batch < 1:
        _fail(f"diagnostics.batch={diag.batch}", "must be >= 1", "use e.g. diagnostics.batch=20")
    if diag.chunk < 0:
        _fail(f"diagnostics.chunk={diag.chunk}", "must be >= 0", "use 0 to size the vectorised passes automatically")
    if not 0.0 <= diag.alpha <= 1.0:
        _fail(f"diagnostics.alpha={diag.alpha}", "must lie in [0, 1]", "e.g. diagnostics.alpha=0.5")
    for name in diag.estimators:
        if name not in ESTIMATORS:
            _fail(f"diagnostics.estimators={list(diag.estimators)}", f"unknown estimator {name}",
                  f"choose from {', '.join(ESTIMATORS)}")
        _check_combination(f"diagnostics.estimators=[...{name}...]", name, obj, k, beta,
                           diag.alpha if name == "gdreg" else None)
    if dataset.n_valid < 1:
        _fail(f"diagnostics.every={diag.every} with dataset.n_valid={dataset.n_valid}",
              "the diagnostics measure on a fixed batch of validation examples, and there are none",
              "use dataset.n_valid >= 1 (e.g. 400), or drop diagnostics.every")
    if diag.batch > dataset.n_valid:  # the batch is the first `batch` validation examples
        _fail(f"diagnostics.batch={diag.batch} with dataset.n_valid={dataset.n_valid}",
              "the fixed batch is the first diagnostics.batch validation examples, and there are fewer",
              f"use diagnostics.batch <= {dataset.n_valid}, or a larger dataset.n_valid")


def validate_fast(fast: Any, device: Any) -> None:
    value = str(getattr(fast, "value", fast)).strip().lower()
    if value not in ("auto", "true", "false"):
        _fail(f"fast={fast}", "unknown setting", f"use {capture.AUTO}, fast=true or fast=false")
    name = device.value if isinstance(device, Enum) else str(device)
    if value == "true" and (name == "cpu" or not cuda_available()):
        _fail("fast=true", "the captured training step needs a CUDA GPU, and this run has none",
              f"use {capture.AUTO} or fast=false")


def validate_model_keys(m: Any) -> None:
    """No setting of the other kind of model (ModelConf holds both kinds' keys): it would be
    ignored by this model yet recorded, and the report would group runs by it."""
    gaussian = m.name == "gaussian"
    default = ModelConf(name=m.name)
    owners = "Burda et al.'s models (burda1, burda2) have it" if gaussian else "model=gaussian has it"
    for key in BURDA_MODEL_ONLY if gaussian else GAUSSIAN_MODEL_ONLY:
        value = OmegaConf.to_object(m[key]) if OmegaConf.is_config(m[key]) else m[key]
        if value != getattr(default, key):
            _fail(f"model.{key}={value}", f"model={m.name} has no setting {key} (only {owners})",
                  f"remove model.{key}=")


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
    if not (_finite(m.output_bias_clip) and 0 < m.output_bias_clip < 0.5):
        _fail(f"model.output_bias_clip={m.output_bias_clip}", "must lie in (0, 0.5)",
              "use e.g. model.output_bias_clip=1e-3")


def _validate_gaussian(m: Any, dataset: Any) -> None:
    if dataset.dim < 1:
        _fail(f"dataset.dim={dataset.dim}", "must be >= 1", "use e.g. dataset.dim=20")
    for key, low in (("n_train", 1), ("n_test", 2)):
        if dataset[key] < low:
            _fail(f"dataset.{key}={dataset[key]}", f"must be >= {low}", f"use e.g. dataset.{key}=1024")
    validate_seed("dataset.seed", dataset.seed)
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
    if not 0.0 <= cfg.alpha <= 1.0:
        _fail(f"alpha={cfg.alpha}", "must lie in [0, 1]", "gdreg is (1-alpha)*dreg + alpha*rws_dreg, e.g. alpha=0.5")
    validate_objective_k(cfg.objective.name, list(cfg.k))
    for k in dict.fromkeys(cfg.k):
        for name in cfg.estimators:
            _check_combination(f"estimators=[...{name}...]", name, cfg.objective.name, k, cfg.beta,
                               cfg.alpha if name == "gdreg" else None)
    for key, low, fix in (("batch", 1, "use batch=1 (one training point, as Rainforth et al.) or more"),
                          ("index", 0, "use index=0 (the first training point) or another row number"),
                          ("chunk", 0, "use chunk=0 to size the vectorised passes automatically")):
        if cfg[key] < low:
            _fail(f"{key}={cfg[key]}", f"must be >= {low}", fix)
    m, k = max(cfg.m), max(cfg.k)  # the grid's largest cell bounds every cell's rows (grid=axes has fewer)
    validate_rows(f"m={m} k={k} batch={cfg.batch} (the grid's largest)", m * k * cfg.batch * max(1, cfg.chunk),
                  "lower the largest k or m of the grid, batch or chunk")
    validate_seed("seed", cfg.seed)
    validate_device(cfg.device)
    if cfg.run:
        run = Path(cfg.run)
        if not (run / rundir.CONFIG).is_file():
            _fail(f"run={run}", "no config.yaml there, so it is not a vaexp run directory",
                  "pass a directory made by vaexp train")
        if not (run / rundir.CHECKPOINT).is_file():
            _fail(f"run={run}", "no checkpoint.pt there (vaexp train writes one at the end of every epoch)",
                  "train it for at least one epoch, or pass another run directory")
        saved = validate_run_files(run)
        validate_model_and_data(saved.model, saved.dataset)
        return
    if not (_finite(cfg.perturb) and cfg.perturb >= 0):
        _fail(f"perturb={cfg.perturb}", "must be a finite number >= 0", "use e.g. perturb=0.01 (Rainforth et al.)")
    validate_dataset_seeds(cfg.dataset)
    if cfg.model.name != "gaussian":
        _fail(f"model={cfg.model.name} without run=",
              "only the analytic model has a known point (its optimum) to measure at",
              "pass run=<dir of a vaexp train run> for a trained model, or use model=gaussian dataset=gaussian")
    validate_model_keys(cfg.model)
    validate_model_and_data(cfg.model, cfg.dataset)
    if cfg.index + cfg.batch > cfg.dataset.n_train:
        _fail(f"index={cfg.index} batch={cfg.batch}", f"the minibatch runs past dataset.n_train={cfg.dataset.n_train}",
              "lower index or batch")


def validate_run_files(run: Path) -> DictConfig:
    """config.yaml and checkpoint.pt of an existing run, read and checked against each other
    (damaged files, a checkpoint of another run); its config (TrainConfig)."""
    saved = rundir.load_config(run, TrainConfig)
    checkpoint = rundir.load_checkpoint(run)
    if checkpoint is not None:
        rundir.check_checkpoint(checkpoint, saved, run)
    return saved


def validate_command(cfg: DictConfig) -> None:
    """Checks for the composed config of train, eval or snr, chosen by Hydra's job name; none of
    them reads or writes the run directory of a train command (validate_train_dir does)."""
    job = cfg.hydra.job.name if "hydra" in cfg else "train"
    if job == "snr":
        validate_snr(cfg)
        return
    if job == "eval":
        if not cfg.run:
            raise VaexpError("vaexp eval needs a run directory: vaexp eval outputs/train/<run>")
        run = Path(cfg.run)
        if not (run / rundir.CONFIG).is_file() or not (run / rundir.CHECKPOINT).is_file():
            raise VaexpError(f"run={run}: not a vaexp run directory (needs config.yaml and checkpoint.pt); "
                             f"pass a directory made by vaexp train")
        validate_eval(cfg.eval)
        validate_device(cfg.device)
        validate_run_files(run)
        return
    cfg = with_mk(cfg)
    validate(cfg)
    if cfg.resume:
        run = Path(cfg.resume)
        if not (run / rundir.CONFIG).is_file():
            raise VaexpError(f"resume={run}: no config.yaml there, so it is not a vaexp run directory; "
                             f"pass a directory made by vaexp train")
        if "hydra" in cfg and str(cfg.hydra.mode) == "RunMode.RUN":
            run_dir = str(cfg.hydra.run.dir)
            if os.path.realpath(run_dir) != os.path.realpath(str(run)):
                raise VaexpError(f"resume={run} with hydra.run.dir={run_dir}: a resumed run continues in its own "
                                 f"directory; drop hydra.run.dir= (or drop resume= to start a new run in {run_dir})")


def validate_train_dir(cfg: DictConfig, run_dir: Path, overrides) -> DictConfig:
    """Checks that read the run directory of `vaexp train` (called while holding its lock): its
    files can be read and belong together, the command agrees with the run there, a resume does
    not shorten the run, and a finished run is re-evaluated with `vaexp eval`, not resume=.
    Returns the config the run will use."""
    run_dir = Path(run_dir)
    cfg = rundir.task_config(with_mk(cfg))
    effective = rundir.effective_config(apply_mk(cfg), run_dir, overrides, TrainConfig)
    if (run_dir / rundir.CONFIG).exists():
        rundir.load_config(run_dir, TrainConfig)
        # The callback checked the composed defaults with the overrides (mnist, burda1, iwae unless
        # given); a run there continues with its own settings, so the checks see those.
        try:
            validate(effective)
        except VaexpError as err:
            where = f"resume={run_dir}" if cfg.get("resume") else f"the run in {run_dir}"
            raise VaexpError(f"{where} (its own settings with the overrides): {err}") from None
    saved = rundir.load_checkpoint(run_dir)
    if saved is None:
        _no_checkpoint_but_trained(run_dir, rundir.n_epochs(effective.schedule), bool(cfg.get("resume")))
        return effective
    rundir.check_checkpoint(saved, effective, run_dir)
    done, total = saved["state"]["epoch"], rundir.n_epochs(effective.schedule)
    if done > total:
        raise VaexpError(f"schedule.epochs={effective.schedule.epochs}: the run in {run_dir} has already trained "
                         f"{done} epochs, and a run cannot be shortened; use schedule.epochs={done} or more (or leave "
                         f"it out), or start a new run")
    metrics, _ = rundir.read_metrics(run_dir)
    if cfg.get("resume") and rundir.judge(metrics, total)[0] == "finished":
        last = metrics["evals"][-1]
        wanted = rundir.as_dict(effective.eval)
        given = [k for k in rundir.override_keys(overrides) if k == "eval" or k.startswith("eval.")]
        changed = [k for k in sorted(wanted) if rundir.covers(given, f"eval.{k}")
                   and wanted[k] != (last.get("settings") or {}).get(k)]
        if changed and last["checkpoint"].get("global_step") == saved["state"]["global_step"]:
            given = " ".join(f"eval.{k}={wanted[k]}" for k in changed)
            raise VaexpError(f"resume={run_dir}: the run is finished ({done}/{total} epochs) and was evaluated with "
                             f"other eval settings; `vaexp eval {run_dir} {given}` evaluates it with these (resume= "
                             f"trains on only when schedule.epochs asks for more)")
    return effective


def _no_checkpoint_but_trained(run_dir: Path, total: int, resume: bool) -> None:
    """A run directory without checkpoint.pt starts from step 0, which is right only where nothing
    was trained yet (a run killed before its first checkpoint, re-run by its command or sweep).
    resume= names a run to continue, and one whose metrics.json records training lost its
    checkpoint: starting over would silently replace what the user asked to continue. A finished
    run's results are all in metrics.json (deleting checkpoints saves disk): its command reports
    them; training it longer needs the checkpoint."""
    metrics, _ = rundir.read_metrics(run_dir)
    if rundir.judge(metrics, total)[0] == "finished":
        return
    run = (metrics or {}).get("run") or {}
    epochs, steps = run.get("epoch") or 0, run.get("global_step") or 0
    restore = f"restore {rundir.CHECKPOINT} (e.g. from a backup)"
    if epochs or steps or (metrics or {}).get("evals"):
        raise VaexpError(f"{run_dir}: no {rundir.CHECKPOINT} there, although {rundir.METRICS} records {epochs} "
                         f"epochs ({steps} steps) of training; {restore}, or move {rundir.METRICS} away to train "
                         f"this run again from the start")
    if resume:
        raise VaexpError(f"resume={run_dir}: no {rundir.CHECKPOINT} there, so there is nothing to continue (it was "
                         f"deleted, or the run stopped before its first checkpoint); {restore}, or drop resume= "
                         f"and run the command that made it, with hydra.run.dir={run_dir}, to train it from the start")


def with_mk(cfg: DictConfig) -> DictConfig:
    """cfg with k = mk/m when the budget mk is set (checked: m divides mk, and a k given on the
    command line agrees), so the checks below see the k the run will use."""
    mk = cfg.get("mk")
    if mk is None:
        return cfg
    given = list(cfg.hydra.overrides.task) if "hydra" in cfg else []
    k = check_mk(mk, cfg.m, cfg.k, "k" in rundir.override_keys(given))
    if k is None:
        return cfg
    cfg = copy.deepcopy(cfg)
    with read_write(cfg), open_dict(cfg):
        cfg.k = k
    return cfg

