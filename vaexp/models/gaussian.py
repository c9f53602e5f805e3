"""The linear-Gaussian model of Rainforth et al. (2018) and Tucker et al. (2019), with exact answers.

p(z_L) = N(μ, I), p(z_{i-1}|z_i) = N(z_i, I), p(x|z_1) = N(z_1, I) (θ = μ); q(z_i|z_{i-1}) =
N(A_i z_{i-1} + b_i, σ_i² I) with z_0 = x (φ = A, b; log σ too with model.learn_q_var=true;
default σ² = 2/3, Rainforth et al.'s). The exact posterior lies in q's family for every L:
A_i* = v_i/(v_i+1) I, b_i* = μ/(v_i+1), σ_i*² = v_i/(v_i+1), v_i = L - i + 1 (docs/DESIGN.md).
Invariants: the model follows vaexp.models.base's protocol, so trainer, objectives, estimators
and evaluation use it unchanged; at q = p(z|x) every log-weight equals log p(x) exactly; the
exact_* answers are computed in fp64. Its data: vaexp.data.gaussian.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from vaexp.errors import VaexpError
from vaexp.models.base import HALF_LOG_2PI, LogWeights, sample_encoder, std_normal_log_prob

RAINFORTH_Q_VAR = 2.0 / 3.0


class LinearGaussianLayer(nn.Module):
    """q(z | h) = N(A h + b, σ² I); log σ is a scalar parameter, or a buffer when fixed."""

    def __init__(self, dim: int, q_var: float, learn_q_var: bool):
        super().__init__()
        self.A = nn.Parameter(torch.zeros(dim, dim))
        self.b = nn.Parameter(torch.zeros(dim))
        logsig = torch.tensor(0.5 * math.log(q_var))
        if learn_q_var:
            self.logsig = nn.Parameter(logsig)
        else:
            self.register_buffer("logsig", logsig)

    def forward(self, h: Tensor) -> Tuple[Tensor, Tensor]:
        """(mean [..., D], log σ as a 0-d tensor)."""
        return h @ self.A.T + self.b, self.logsig


class LinearGaussianVAE(nn.Module):
    """p: z_L → ... → z_1 → x, each step adding N(0, I); q: x → z_1 → ... → z_L, linear-Gaussian."""

    def __init__(self, dim: int, layers: int = 1, q_var: float = RAINFORTH_Q_VAR, learn_q_var: bool = False):
        super().__init__()
        self.dim, self.layers = int(dim), int(layers)
        self.latents = [self.dim] * self.layers
        self.mu = nn.Parameter(torch.zeros(self.dim))  # θ: the prior mean of the top layer
        # φ, bottom first. Zero A and b: q(z|x) starts as N(0, σ²I), a valid point away from the optimum.
        self.encoder = nn.ModuleList(LinearGaussianLayer(self.dim, q_var, learn_q_var) for _ in range(self.layers))

    @classmethod
    def from_config(cls, cfg, dim: int) -> "LinearGaussianVAE":
        if any(int(v) != dim for v in cfg.latents):  # also checked before a run starts (vaexp.cli.checks)
            raise VaexpError(f"model.latents={list(cfg.latents)}: every layer of the linear-Gaussian model has "
                             f"the data dimension {dim}; use model.latents=[{dim}] or [{dim},{dim}]")
        return cls(dim, len(cfg.latents), cfg.q_var, cfg.learn_q_var)

    def theta_parameters(self) -> List[nn.Parameter]:
        return [self.mu]

    def phi_parameters(self) -> List[nn.Parameter]:
        return list(self.encoder.parameters())

    # -- the log-weights (the same contract as models.VAE.log_weights) ------------------------
    def log_weights(self, x: Tensor, m: int, k: int, need_bar: bool = False,
                    generator: Optional[torch.Generator] = None,
                    eps: Optional[List[Tensor]] = None, need_score: bool = False) -> LogWeights:
        """z ~ q(z|x) with shape [M, K, B, D] per layer; lw = log p(x, z) - log q(z|x) [M, K, B].

        lw_bar: the same values with q's parameters detached and z (and z_{i-1} as the input of
        q(z_i|z_{i-1})) kept live, as the STL and DReG estimators need. eps: the standard-normal
        draws to use instead of drawing them, one [M, K, B, D] tensor per layer (as models.VAE);
        need_score: also log_q_score, log q at the stopped samples (vaexp.models.base.LogWeights)."""
        zs, log_q, log_q_bar, log_q_score = sample_encoder(self.encoder, x, m, k, need_bar, generator, eps,
                                                           need_score)
        log_p = self.log_joint(x, zs)
        return LogWeights(log_p - log_q, log_p - log_q_bar if need_bar else None, zs, log_q_score)

    def log_joint(self, x: Tensor, zs: List[Tensor]) -> Tensor:
        """log p(x, z_1..z_L): unit-variance Gaussian steps down the chain from N(μ, I)."""
        log_p = std_normal_log_prob(x - zs[0])
        for i in range(1, len(zs)):
            log_p = log_p + std_normal_log_prob(zs[i - 1] - zs[i])
        return log_p + std_normal_log_prob(zs[-1] - self.mu)

    # -- exact answers ---------------------------------------------------------------------------
    def prior_variances(self) -> List[int]:
        """v_i: the marginal variance of z_i under p, bottom layer first (v_L = 1)."""
        return [self.layers - i for i in range(self.layers)]

    @torch.no_grad()
    def exact_log_px(self, x: Tensor) -> Tensor:
        """log p_θ(x) = log N(x; μ, (L+1) I) per example, fp64 [B]."""
        x, mu = x.double(), self.mu.detach().double()
        var = self.layers + 1.0
        return (-0.5 * (x - mu) ** 2 / var - 0.5 * math.log(var) - HALF_LOG_2PI).sum(-1)

    @torch.no_grad()
    def exact_posterior(self) -> List[Tuple[Tensor, Tensor, float]]:
        """p(z_i | z_{i-1}) = N(a_i z_{i-1} + b_i, s_i² I) per layer (z_0 = x): [(A_i, b_i, s_i²)]."""
        mu = self.mu.detach()
        eye = torch.eye(self.dim, dtype=mu.dtype, device=mu.device)
        return [(v / (v + 1.0) * eye, mu / (v + 1.0), v / (v + 1.0)) for v in self.prior_variances()]

    @torch.no_grad()
    def set_exact_posterior(self) -> None:
        """q := p(z|x) (means and variances), so every bound is exact with zero variance."""
        for layer, (A, b, var) in zip(self.encoder, self.exact_posterior()):
            layer.A.copy_(A)
            layer.b.copy_(b)
            layer.logsig.fill_(0.5 * math.log(var))

    @torch.no_grad()
    def set_optimum(self, x_train: Tensor) -> None:
        """The optimum for the data x_train: μ* = the sample mean (the maximum-likelihood μ, for any
        L), q's means at the exact posterior's, and q's variances at the exact ones only where they
        are learnable (a fixed σ stays: A*, b* are the optimum of every bound for a fixed σ)."""
        self.mu.copy_(x_train.to(self.mu.dtype).mean(0))
        for layer, (A, b, var) in zip(self.encoder, self.exact_posterior()):
            layer.A.copy_(A)
            layer.b.copy_(b)
            if isinstance(layer.logsig, nn.Parameter):
                layer.logsig.fill_(0.5 * math.log(var))

    @torch.no_grad()
    def perturb(self, std: float, generator: torch.Generator) -> None:
        """Add N(0, std²) to every parameter (Rainforth et al.'s point near the optimum)."""
        for p in self.parameters():
            p.add_(std * torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device))

    @torch.no_grad()
    def exact_elbo(self, x: Tensor) -> Tensor:
        """The exact ELBO per example (fp64 [B]): log p(x) - KL(q(z_1..L|x) ‖ p(z_1..L|x)), the KL
        between the two joint Gaussians over all layers (both chains are linear-Gaussian)."""
        x = x.double()
        q_steps = [(l.A.detach().double(), l.b.detach().double(), float(torch.exp(2 * l.logsig.detach())))
                   for l in self.encoder]
        p_steps = [(A.double(), b.double(), var) for A, b, var in self.exact_posterior()]
        mq, cq = _chain_gaussian(x, q_steps)
        mp, cp = _chain_gaussian(x, p_steps)
        n = cq.shape[0]
        cp_inv = torch.linalg.inv(cp)
        diff = mp - mq  # [B, n]
        kl = 0.5 * (torch.trace(cp_inv @ cq) - n + torch.logdet(cp) - torch.logdet(cq)
                    + ((diff @ cp_inv) * diff).sum(-1))
        return self.exact_log_px(x) - kl

    # -- evaluation helpers (active units; pictures are skipped: the data are not images) --------
    @torch.no_grad()
    def posterior_means(self, x: Tensor, samples: int = 0, generator: Optional[torch.Generator] = None) -> List[Tensor]:
        """E_q[z_i | x] per layer, exact for every layer: the chain of means is linear."""
        means, h = [], x
        for layer in self.encoder:
            h, _ = layer(h)
            means.append(h)
        return means

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """n draws of x from p_θ(x)."""
        mu = self.mu
        z = mu + torch.randn((n, self.dim), generator=generator, dtype=mu.dtype, device=mu.device)
        for _ in range(self.layers):
            z = z + torch.randn(z.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        return z

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """E[x | z_1] at q's mean of z_1 (p(x|z_1) has mean z_1)."""
        return self.posterior_means(x)[0]


def _chain_gaussian(x: Tensor, steps) -> Tuple[Tensor, Tensor]:
    """Joint mean [B, L·D] and covariance [L·D, L·D] of z_i = A_i z_{i-1} + b_i + s_i ε_i, z_0 = x."""
    D = x.shape[-1]
    L = len(steps)
    means, cov = [], torch.zeros(L * D, L * D, dtype=x.dtype, device=x.device)
    h = x
    for i, (A, b, var) in enumerate(steps):
        h = h @ A.T + b
        means.append(h)
        blk = slice(i * D, (i + 1) * D)
        if i == 0:
            cov[blk, blk] = var * torch.eye(D, dtype=x.dtype, device=x.device)
        else:
            prev = slice((i - 1) * D, i * D)
            cross = A @ cov[prev, : i * D]  # Cov(z_i, z_j) = A_i Cov(z_{i-1}, z_j), j < i
            cov[blk, : i * D] = cross
            cov[: i * D, blk] = cross.T
            cov[blk, blk] = A @ cov[prev, prev] @ A.T + var * torch.eye(D, dtype=x.dtype, device=x.device)
    return torch.cat(means, -1), cov
