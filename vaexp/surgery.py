"""ELBO surgery (Hoffman & Johnson, 2016): avgKL = I(x; z) + KL(q(z)‖p(z)) over N test images.

recon = E[log p(x|z)], avgKL = (1/N) Σ KL(q(z|x_n)‖p(z)) in closed form given the sampled layer
below, I = mean of log q(z|x_n) − log q(z) at the same draws (q(z) the aggregate posterior, an
exact log-sum-exp over the N components in fp64 chunks), KL(q(z)‖p(z)) = avgKL − I.
Invariants: I <= log N term by term (each image's own component is in q(z)), I >= 0 in expectation;
the identity holds by construction (fp64 rounding); an encoder whose σ is below what fp32 resolves
at its means (a diverged run's) gets I = KL(q(z)‖p(z)) = NaN with a warning, not a number;
for more than one stochastic layer q(z2|z1) does not see x, so I(x; z) = I(x; z1) and avgKL is
the KL the ELBO itself contains (docs/DESIGN.md).
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional

import torch
from torch import Tensor

from vaexp.models.base import bernoulli_log_prob, gaussian_log_prob
from vaexp.models.burda import VAE

_LOG_2PI = math.log(2 * math.pi)
# log-density entries per chunk of the N_rows × N matrix (fp64: 8 bytes each).
_CHUNK_ENTRIES = 1 << 22
# σ / |μ| below which a posterior is not resolved: ~80 float32 ulps, where log_aggregate's fp64
# expansion still errs by < 1e-5 nats (1e-16 · (|μ|/σ)²).
RESOLVED = 1e-5


def supported(model) -> bool:
    """Surgery needs a Gaussian encoder, a Bernoulli decoder and p(z_L) = N(0, I): vaexp.models.burda.VAE."""
    return isinstance(model, VAE)


def _neg_entropy(logsig: Tensor) -> Tensor:
    """E_q[log q] of a diagonal Gaussian with log σ = logsig (sum over the last axis)."""
    return -(logsig + 0.5 * (1.0 + _LOG_2PI)).sum(-1)


def _std_normal_cross_entropy(mu: Tensor, logsig: Tensor) -> Tensor:
    """E_{N(mu, σ²)}[log N(z; 0, I)] (sum over the last axis)."""
    return (-0.5 * (mu ** 2 + torch.exp(2 * logsig)) - 0.5 * _LOG_2PI).sum(-1)


def log_aggregate(z: Tensor, mu: Tensor, logsig: Tensor, chunk_entries: int = _CHUNK_ENTRIES) -> Tensor:
    """log q̂(z) = log (1/N) Σ_m N(z; mu_m, σ_m²) for each row of z [R, D], in fp64.

    Uses Σ_d (z_d − μ_md)² / σ_md² = z² · w_m − 2 z · (μ w)_m + Σ μ² w_m with w = 1/σ², as two
    matrix products per chunk of rows.
    """
    z, mu, logsig = z.double(), mu.double(), logsig.double()
    n, d = mu.shape
    w = torch.exp(-2 * logsig)                                  # [N, D]
    const = -0.5 * (mu ** 2 * w).sum(-1) - logsig.sum(-1) - 0.5 * d * _LOG_2PI   # [N]
    rows = max(1, chunk_entries // max(n, 1))
    out = torch.empty(z.shape[0], dtype=torch.float64, device=z.device)
    for start in range(0, z.shape[0], rows):
        zc = z[start:start + rows]
        quad = -0.5 * (zc ** 2) @ w.T + zc @ (mu * w).T          # [r, N]
        out[start:start + rows] = torch.logsumexp(quad + const, dim=1) - math.log(n)
    return out


@torch.no_grad()
def elbo_surgery(model: VAE, x: Tensor, samples: int, generator: Optional[torch.Generator] = None,
                 chunk_entries: int = _CHUNK_ENTRIES) -> Dict[str, float]:
    """recon, avgKL, I(x;z) and KL(q(z)‖p(z)) over the images x [N, x_dim] (see the module doc)."""
    n = x.shape[0]
    s = int(samples)
    mu1, logsig1 = model.encoder[0](x)                            # [N, D1]
    eps = torch.randn((s,) + mu1.shape, generator=generator, device=x.device, dtype=mu1.dtype)
    z1 = mu1 + torch.exp(logsig1) * eps                           # [S, N, D1]
    zs: List[Tensor] = [z1]
    # Upper layers: E[log q(z_i|z_{i-1})] in closed form given the sampled z_{i-1}. The same term
    # is part of A and of B (q(z) = q̂(z_1) Π q(z_i|z_{i-1})), so it cancels in I.
    upper_neg_entropy = torch.zeros(s, n, dtype=torch.float64, device=x.device)
    top_mu, top_logsig = mu1, logsig1
    h = z1
    for layer in model.encoder[1:]:
        mu, logsig = layer(h)
        upper_neg_entropy += _neg_entropy(logsig).double()
        z = mu + torch.exp(logsig) * torch.randn(mu.shape, generator=generator, device=x.device, dtype=mu.dtype)
        zs.append(z)
        top_mu, top_logsig = mu, logsig
        h = z

    # C = E[log p(z)]: p(z_L) = N(0, I) in closed form given the layer below (for L = 1: given x);
    # p(z_i | z_{i+1}) for i < L at the samples.
    log_prior = _std_normal_cross_entropy(top_mu, top_logsig).double()
    if log_prior.dim() == 1:
        log_prior = log_prior.expand(s, n)
    for i in range(len(zs) - 1):
        mu, logsig = model.decoder[i + 1](zs[i + 1])
        log_prior = log_prior + gaussian_log_prob(zs[i], mu, logsig).double()

    # recon = E[log p(x|z_1)], one decoder pass per sample.
    recon = torch.stack([bernoulli_log_prob(x, model.decoder[0](z1[j])).double() for j in range(s)])  # [S, N]

    # avgKL = A − C, A = E[log q(z|x)] with closed-form entropies.
    avg_kl = (_neg_entropy(logsig1).double().mean() + upper_neg_entropy.mean()) - log_prior.mean()
    # I: log q(z_1|x_n) − log q̂(z_1) at the same draws (the upper layers' factors cancel). Where σ
    # < RESOLVED·|μ|, the fp32 draws lose σε and log_aggregate's expansion cancels (errors of order
    # 1e-16·|μ|²/σ² nats): no number rather than a wrong one.
    if bool((torch.exp(logsig1) < RESOLVED * mu1.abs()).any()):
        warnings.warn("vaexp: ELBO surgery: the encoder's posteriors are narrower than float32 resolves at their "
                      "means (sigma < 1e-5 |mu|, as after a divergence): I(x;z) and KL(q(z)||p(z)) are reported "
                      "as NaN", RuntimeWarning, stacklevel=2)
        mutual_info = torch.tensor(float("nan"), dtype=torch.float64)
    else:
        log_q1 = gaussian_log_prob(z1.double(), mu1.double(), logsig1.double())                 # [S, N]
        log_agg = log_aggregate(z1.reshape(s * n, -1), mu1, logsig1, chunk_entries).reshape(s, n)
        mutual_info = (log_q1 - log_agg).mean()
    return {
        "surgery_n": int(n),
        "surgery_samples": s,
        "recon": float(recon.mean()),
        "avg_kl": float(avg_kl),
        "mutual_info": float(mutual_info),
        "marginal_kl": float(avg_kl - mutual_info),
        "mutual_info_max": math.log(n),
    }
