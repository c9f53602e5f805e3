"""Gradient diagnostics during training: variance, SNR and bias of estimators along the run's path.

Every ``diagnostics.every`` steps (vaexp.schema.DiagnosticsConf), at the run's current parameters
and a fixed held-out batch (its first ``diagnostics.batch`` validation examples), R =
``diagnostics.draws`` draws of θ's gradient and of each listed estimator's φ gradient, through
vaexp.gradstats (vectorised, common random numbers; reparam always drawn, and logged, as the
bias reference), logged to the run's TensorBoard at the global step:
  diag/theta/{variance, snr_median, snr_ratio}
  diag/phi_<estimator>/{variance, snr_median, snr_ratio, bias_z}   (no bias_z for reparam)
  diag/seconds                                                      the call's wall time
(statistics defined in vaexp.gradstats). Invariants: off (every unset) the loop builds nothing
and calls nothing; on, the draws come from their own generator seeded by (seed, global step),
never the run's ε generator, and only read the parameters, so a run trains bit for bit the same
with and without diagnostics (tests/test_diagnostics.py checks both).
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from vaexp.estimators import get_estimator
from vaexp.gradstats import GradientSampler, Moments, bias_z, draw_moments, per_parameter_snr, snr_ratio_of_averages
from vaexp.objectives import make_objective


def diagnostics_seed(seed: int, global_step: int) -> int:
    """The draws' own stream at a step: reproducible, and apart from the run's ε generator."""
    return (seed * 1_000_003 + global_step * 104_729 + 29) % (2 ** 63)


def statistics(mom: Moments, diff: Optional[Moments] = None) -> Dict[str, float]:
    """variance (mean over parameters), snr_median, snr_ratio and, given paired differences
    against the reference, bias_z (vaexp.gradstats)."""
    snr = per_parameter_snr(mom.mean, mom.std())
    finite = snr[torch.isfinite(snr)]
    out = {"variance": float(mom.var().mean()),
           "snr_median": float(finite.median()) if finite.numel() else float("nan"),
           "snr_ratio": snr_ratio_of_averages(mom)}
    if diff is not None:
        out["bias_z"] = bias_z(diff)
    return out


class Diagnostics:
    """One run's diagnostics: which estimators, on which batch, with how many draws."""

    def __init__(self, cfg, x_valid: torch.Tensor, device: torch.device):
        d = cfg.diagnostics
        self.every, self.draws, self.chunk = int(d.every), int(d.draws), int(d.chunk)
        self.m, self.k, self.seed, self.device = int(cfg.m), int(cfg.k), int(cfg.seed), device
        self.objective = make_objective(cfg.objective.name, cfg.beta)
        if d.estimators:
            self.names = list(dict.fromkeys(d.estimators))
            alpha = float(d.alpha)
        else:  # the run's own estimator, with its own alpha
            self.names = [cfg.estimator.name]
            alpha = cfg.estimator.get("alpha")
        ests = [get_estimator(n, alpha if n == "gdreg" else None) for n in self.names]
        if "reparam" not in self.names:
            ests.append(get_estimator("reparam"))
        self.estimators = ests
        self.reference = [e.name for e in ests].index("reparam")
        self.x = x_valid[: int(d.batch)]

    def measure(self, model: nn.Module, global_step: int) -> Dict[str, float]:
        """The statistics at the model's current parameters, as TensorBoard tag -> value."""
        t0 = time.perf_counter()
        sampler = GradientSampler(model, self.x, self.objective, self.estimators)
        gen = torch.Generator(device=self.device).manual_seed(diagnostics_seed(self.seed, global_step))
        theta, phi, diff = draw_moments(sampler, self.m, self.k, self.draws, self.chunk, gen, self.reference)
        out = {f"diag/theta/{key}": v for key, v in statistics(theta).items()}
        for name, mom, d in zip([e.name for e in self.estimators], phi, diff):
            out.update({f"diag/phi_{name}/{key}": v for key, v in statistics(mom, d).items()})
        out["diag/seconds"] = time.perf_counter() - t0  # the floats above have synchronised the device
        return out


class LoopDiagnostics:
    """The loop's hook: every `every` global steps, each live run's diagnostics, logged."""

    def __init__(self, per_run: List[Diagnostics]):
        self.per_run = per_run
        self.every = per_run[0].every

    def __call__(self, step, runs: Sequence, alive: Sequence[int], global_step: int) -> None:
        step.sync([r.model for r in runs])  # a stack's parameters into the runs' own models
        for j in alive:
            runs[j].log.scalars(self.per_run[j].measure(runs[j].model, global_step), global_step)


def loop_diagnostics(runs: Sequence, x_valid: torch.Tensor, device: torch.device) -> Optional[LoopDiagnostics]:
    """None when diagnostics are off (the loop then does no extra work)."""
    d = runs[0].cfg.get("diagnostics")
    if d is None or d.get("every") is None:
        return None
    return LoopDiagnostics([Diagnostics(r.cfg, x_valid, device) for r in runs])
