"""Burda et al.'s architectures: Gaussian stochastic layers, Bernoulli observations.

The encoder (φ) is q(z1|x) q(z2|z1) ...; the decoder (θ) is p(x|z1) p(z1|z2) ... p(z_L) with
p(z_L) = N(0, I). Samples have shape [M, K, B, D]; the first encoder layer runs once per
example and only the layers above it (which condition on a sample) run per sample.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor, nn

from vaexp.models.base import LogWeights, gaussian_log_prob, sample_encoder, std_normal_log_prob
from vaexp.models.dense import MLP, Linear
from vaexp.models.likelihood import bernoulli_log_lik

# The one list of activations (the config checks read it).
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "softplus": nn.Softplus}


def mlp(n_in: int, width: int, depth: int, activation: str) -> MLP:
    layers: List[nn.Module] = []
    for i in range(depth):
        layers += [Linear(n_in if i == 0 else width, width), ACTIVATIONS[activation]()]
    return MLP(*layers)


class GaussianLayer(nn.Module):
    """h -> (mu, log sigma) of a diagonal Gaussian."""

    def __init__(self, n_in: int, width: int, depth: int, n_out: int, activation: str):
        super().__init__()
        self.net = mlp(n_in, width, depth, activation)
        self.mu = Linear(width, n_out)
        self.logsig = Linear(width, n_out)

    def forward(self, h: Tensor):
        h = self.net(h)
        return self.mu(h), self.logsig(h)


class BernoulliLayer(nn.Module):
    """h -> logits of independent Bernoullis."""

    def __init__(self, n_in: int, width: int, depth: int, n_out: int, activation: str):
        super().__init__()
        self.net = mlp(n_in, width, depth, activation)
        self.logits = Linear(width, n_out)

    def forward(self, h: Tensor) -> Tensor:
        return self.logits(self.net(h))


class VAE(nn.Module):
    def __init__(self, latents, hidden, depth: int = 2, activation: str = "tanh",
                 x_dim: int = 784, train_mean: Optional[Tensor] = None, output_bias_clip: float = 1e-3):
        super().__init__()
        latents, hidden = list(latents), list(hidden)
        self.latents, self.x_dim = latents, x_dim
        ins = [x_dim] + latents[:-1]
        # q(z_i | z_{i-1}), bottom first.
        self.encoder = nn.ModuleList(
            GaussianLayer(ins[i], hidden[i], depth, latents[i], activation) for i in range(len(latents)))
        # p(x | z1), then p(z_i | z_{i+1}) for i = 1..L-1.
        self.decoder = nn.ModuleList(
            [BernoulliLayer(latents[0], hidden[0], depth, x_dim, activation)]
            + [GaussianLayer(latents[i + 1], hidden[i + 1], depth, latents[i], activation)
               for i in range(len(latents) - 1)])
        self.reset_parameters(train_mean, output_bias_clip)

    @classmethod
    def from_config(cls, cfg, x_dim: int = 784, train_mean: Optional[Tensor] = None) -> "VAE":
        return cls(cfg.latents, cfg.hidden, cfg.depth, cfg.activation, x_dim, train_mean, cfg.output_bias_clip)

    def reset_parameters(self, train_mean: Optional[Tensor] = None, clip: float = 1e-3) -> None:
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                nn.init.zeros_(mod.bias)
        if train_mean is not None:
            p = train_mean.detach().to(torch.float32).clamp(clip, 1 - clip)
            with torch.no_grad():
                self.decoder[0].logits.bias.copy_(torch.log(p) - torch.log1p(-p))

    def theta_parameters(self) -> List[nn.Parameter]:
        return list(self.decoder.parameters())

    def phi_parameters(self) -> List[nn.Parameter]:
        return list(self.encoder.parameters())

    # -- the log-weights ---------------------------------------------------------------------
    def log_weights(self, x: Tensor, m: int, k: int, need_bar: bool = False,
                    generator: Optional[torch.Generator] = None,
                    eps: Optional[List[Tensor]] = None, need_score: bool = False) -> LogWeights:
        """Draw z ~ q(z|x) with shape [M, K, B, D] and return the log-weights.

        x: [B, x_dim] binary. With need_bar, also lw_bar: log q recomputed with the encoder's
        parameters detached, z (and z_{i-1} as the input of q(z_i|z_{i-1})) kept live.
        eps: the standard-normal draws to use instead of drawing them from `generator`, one
        [M, K, B, D_i] tensor per stochastic layer (bottom first); the same values give the same
        log-weights as drawing them here (evaluation passes several draw blocks at once this way).
        need_score: also log_q_score, log q at the stopped samples (vaexp.models.base.LogWeights).
        """
        zs, log_q, log_q_bar, log_q_score = sample_encoder(self.encoder, x, m, k, need_bar, generator, eps,
                                                           need_score)
        log_p = self.log_joint(x, zs)
        return LogWeights(log_p - log_q, log_p - log_q_bar if need_bar else None, zs, log_q_score)

    def log_joint(self, x: Tensor, zs: List[Tensor]) -> Tensor:
        """log p(x, z1..zL) for samples zs[i] of shape [..., B, D_i]."""
        log_p = bernoulli_log_lik(x, self.decoder[0](zs[0]))
        for i in range(1, len(zs)):
            mu, logsig = self.decoder[i](zs[i])
            log_p = log_p + gaussian_log_prob(zs[i - 1], mu, logsig)
        return log_p + std_normal_log_prob(zs[-1])

    # -- helpers for evaluation and pictures ------------------------------------------------
    @torch.no_grad()
    def posterior_means(self, x: Tensor, samples: int, generator: Optional[torch.Generator] = None) -> List[Tensor]:
        """E_q[z_i | x] per stochastic layer, [B, D_i]. Exact for the first layer, Monte Carlo
        with `samples` draws of the layers below for the others."""
        mu, logsig = self.encoder[0](x)
        means = [mu]
        if len(self.encoder) > 1:
            eps = torch.randn((samples,) + mu.shape, generator=generator, device=x.device, dtype=mu.dtype)
            h = mu + torch.exp(logsig) * eps
            for layer in self.encoder[1:]:
                mu_i, logsig_i = layer(h)
                means.append(mu_i.mean(0))
                eps = torch.randn(mu_i.shape, generator=generator, device=x.device, dtype=mu_i.dtype)
                h = mu_i + torch.exp(logsig_i) * eps
        return means

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """Pixel probabilities of n images from the generative model."""
        w = self.decoder[0].logits.weight
        dev, dtype = w.device, w.dtype
        z = torch.randn(n, self.latents[-1], generator=generator, device=dev, dtype=dtype)
        for layer in reversed(self.decoder[1:]):
            mu, logsig = layer(z)
            z = mu + torch.exp(logsig) * torch.randn(mu.shape, generator=generator, device=dev, dtype=dtype)
        return torch.sigmoid(self.decoder[0](z))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Pixel probabilities of p(x | z) at the encoder means, layer by layer."""
        h = x
        for layer in self.encoder:
            h, _ = layer(h)
        for layer in reversed(self.decoder[1:]):
            h, _ = layer(h)
        return torch.sigmoid(self.decoder[0](h))
