"""What every model shares: log-densities, the LogWeights record and the encoder's sampler.

The model protocol (vaexp.models.burda.VAE, vaexp.models.gaussian.LinearGaussianVAE):
``log_weights(x, m, k, need_bar, generator, eps) -> LogWeights``, ``theta_parameters()``,
``phi_parameters()``, ``posterior_means(x, samples, generator)``, ``sample(n)``,
``reconstruct(x)``, and ``encoder``: one module per stochastic layer, bottom first, each
h -> (mu, log sigma). Invariants of ``sample_encoder``: samples are [M, K, B, D_i]; the first
encoder layer runs once per example; ε comes from `generator` in layer order (or is given);
log q is written in ε (same value, fewer ops); lw̄ has the encoder's *parameters* stopped while z
(and z_{i-1} as the input of q(z_i|z_{i-1})) stays live, as STL and DReG need; log q̊ (need_score)
is log q_φ(z|x) at the samples held fixed (every z_i stopped) with the parameters live, so its
φ-gradient is the score ∇φ log q(z|x) that RWS and VIMCO need.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_log_prob(z: Tensor, mu: Tensor, logsig: Tensor) -> Tensor:
    """log N(z; mu, diag exp(logsig)^2), summed over the last axis."""
    return (-0.5 * ((z - mu) * torch.exp(-logsig)) ** 2 - logsig - HALF_LOG_2PI).sum(-1)


def std_normal_log_prob(z: Tensor) -> Tensor:
    return (-0.5 * z ** 2 - HALF_LOG_2PI).sum(-1)


def bernoulli_log_prob(x: Tensor, logits: Tensor) -> Tensor:
    """log Bernoulli(x; sigmoid(logits)) summed over pixels, stable for large |logits|: the plain
    formula (the reference; the models use vaexp.models.likelihood.bernoulli_log_lik, its fused form)."""
    return (x * logits - nn.functional.softplus(logits)).sum(-1)


class LogWeights(NamedTuple):
    lw: Tensor                 # [M, K, B] log p(x, z) - log q(z|x), everything live
    lw_bar: Optional[Tensor]   # same values, encoder parameters stopped, z still reparameterised
    zs: List[Tensor]           # samples per stochastic layer, each [M, K, B, D_i]
    # [M, K, B] log q_φ(z|x) with every z_i stopped and the parameters live (need_score), else None
    log_q_score: Optional[Tensor] = None


def sample_encoder(encoder, x: Tensor, m: int, k: int, need_bar: bool = False,
                   generator: Optional[torch.Generator] = None, eps: Optional[List[Tensor]] = None,
                   need_score: bool = False):
    """z ~ q(z|x) through a chain of Gaussian layers (each h -> (mu, log sigma)), bottom first.

    Returns (zs, log_q, log_q_bar, log_q_score): samples [M, K, B, D_i] per layer and log q(z|x)
    [M, K, B]; with need_bar also log q with the layers' *parameters* detached, with need_score
    log q at the stopped samples with the parameters live (see the module docstring; else None).
    eps: standard-normal draws to use instead of drawing them, one per layer.
    """
    B = x.shape[0]
    h: Tensor = x
    log_q = x.new_zeros(m, k, B)
    log_q_bar = x.new_zeros(m, k, B) if need_bar else None
    log_q_score = x.new_zeros(m, k, B) if need_score else None
    zs: List[Tensor] = []
    for i, layer in enumerate(encoder):
        mu, logsig = layer(h)
        if eps is None:
            e = torch.randn((m, k, B, mu.shape[-1]) if i == 0 else mu.shape,
                            generator=generator, device=x.device, dtype=mu.dtype)
        else:
            e = eps[i]
        z = mu + torch.exp(logsig) * e
        log_q = log_q + (-0.5 * e ** 2 - logsig - HALF_LOG_2PI).sum(-1)
        if need_bar:
            if i == 0:  # the input x carries no parameters: detaching the outputs suffices
                mu_s, logsig_s = mu.detach(), logsig.detach()
            else:       # parameters stopped, the input z_{i-1} stays live
                frozen = {n: p.detach() for n, p in layer.named_parameters()}
                mu_s, logsig_s = functional_call(layer, frozen, (h,))
            log_q_bar = log_q_bar + gaussian_log_prob(z, mu_s, logsig_s)
        if need_score:
            # z_i stopped, and z_{i-1} stopped as the input too: only the explicit dependence on φ
            mu_f, logsig_f = (mu, logsig) if i == 0 else layer(h.detach())
            log_q_score = log_q_score + gaussian_log_prob(z.detach(), mu_f, logsig_f)
        zs.append(z)
        h = z
    return zs, log_q, log_q_bar, log_q_score
