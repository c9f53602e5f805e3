"""N models of one shape as one module with a leading model axis (baddbmm instead of N matmuls).

At batch 20 a step is launch-bound: N runs trained one after another pay N times the per-op
overhead for little arithmetic each. Here the N runs' Linear layers become one StackedLinear
with weights [N, in, out] and the log-weights come out as lw[N, M·K, B]. Invariants: parameter
names are the lone VAE's (``encoder.0.net.0.weight`` ...) with a leading axis of size N;
:func:`to_model` / :func:`from_models` are the only conversions between the stacked layout
(weights transposed) and nn.Linear's; model n's ε come from its own generator in the order a
lone VAE draws them, so stacked and lone runs compute the same thing up to float rounding.
"""
from __future__ import annotations

import copy
from typing import Any, List, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from vaexp.errors import VaexpError
from vaexp.models.base import HALF_LOG_2PI, LogWeights, gaussian_log_prob, std_normal_log_prob
from vaexp.models.burda import VAE
from vaexp.models.likelihood import bernoulli_log_lik


class StackedLinear(nn.Module):
    """N Linear layers of one shape: input [N, ..., in] → [N, ..., out].

    The weight is held *transposed*, [N, in, out] (bias [N, out]): then baddbmm's weight
    gradient comes out contiguous, and Adam's elementwise updates run on contiguous memory
    (with [N, out, in] they get a transposed view and take PyTorch's slow strided path).
    :func:`to_model` / :func:`from_models` convert a slice to and from nn.Linear's [out, in].
    """

    def __init__(self, linears: Sequence[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(from_models("weight", [lin.weight.detach() for lin in linears]))
        self.bias = nn.Parameter(from_models("bias", [lin.bias.detach() for lin in linears]))

    def forward(self, h: Tensor) -> Tensor:
        n, n_in = h.shape[0], h.shape[-1]
        out = torch.baddbmm(self.bias.unsqueeze(1), h.reshape(n, -1, n_in), self.weight)
        return out.reshape(*h.shape[:-1], self.weight.shape[2])


def to_model(name: str, stacked: Tensor, n: int) -> Tensor:
    """Slice n of a stacked parameter (or of its Adam state) in the lone model's layout."""
    return stacked[n].transpose(0, 1) if name.endswith("weight") else stacked[n]


def from_models(name: str, tensors: Sequence[Tensor]) -> Tensor:
    """The stacked tensor (stacked layout, contiguous) of N lone-model tensors."""
    if name.endswith("weight"):
        return torch.stack([t.transpose(0, 1) for t in tensors]).contiguous()
    return torch.stack(list(tensors)).contiguous()


def _stack_modules(modules: Sequence[nn.Module]) -> nn.Module:
    """A copy of modules[0] with every nn.Linear replaced by the StackedLinear of all modules'
    Linear at that place (activations work on any shape, so the rest is reused as it is)."""
    out = copy.deepcopy(modules[0])
    for name, sub in list(out.named_modules()):
        if isinstance(sub, nn.Linear):
            parent_name, _, child = name.rpartition(".")
            parent = out.get_submodule(parent_name) if parent_name else out
            setattr(parent, child, StackedLinear([m.get_submodule(name) for m in modules]))
    for name, sub in out.named_modules():
        if any(True for _ in sub.parameters(recurse=False)) and not isinstance(sub, StackedLinear):
            raise VaexpError(f"cannot stack {type(sub).__name__} at {name!r}: only Linear layers hold parameters")
    return out


class StackedVAE(nn.Module):
    """N ``vaexp.models.burda.VAE`` of one shape as one module with a leading model axis. Parameter names
    are the VAE's (``encoder.0.net.0.weight`` ...), each with a leading axis of size N (weights
    transposed: see StackedLinear)."""

    def __init__(self, models: Sequence[VAE]):
        super().__init__()
        if not models:
            raise VaexpError("nothing to stack")
        first = models[0]
        for m in models:
            if not isinstance(m, VAE):
                raise VaexpError(f"only vaexp.models.burda.VAE models stack, not {type(m).__name__}")
            shapes = [(n, p.shape) for n, p in m.named_parameters()]
            if shapes != [(n, p.shape) for n, p in first.named_parameters()]:
                raise VaexpError("stacked models must have the same architecture")
        self.n = len(models)
        self.latents, self.x_dim = list(first.latents), first.x_dim
        self.encoder = _stack_modules([m.encoder for m in models])
        self.decoder = _stack_modules([m.decoder for m in models])

    def theta_parameters(self) -> List[nn.Parameter]:
        return list(self.decoder.parameters())

    def phi_parameters(self) -> List[nn.Parameter]:
        return list(self.encoder.parameters())

    @torch.no_grad()
    def copy_to(self, models: Sequence[nn.Module]) -> None:
        """Write model n's slice into models[n] (a VAE of the same shape)."""
        mine = dict(self.named_parameters())
        for n, model in enumerate(models):
            for name, p in model.named_parameters():
                p.copy_(to_model(name, mine[name], n))

    def draw_eps(self, generators: Sequence[torch.Generator], mk: int, batch: int) -> List[Tensor]:
        """ε per layer, [N, M·K, B, D_i]; model n's from generators[n], in the order a lone VAE
        draws them (layer by layer), so its values are those of the lone run's [M, K, B, D_i]."""
        w = self.decoder[0].logits.bias
        eps = []
        for d in self.latents:
            e = torch.empty(self.n, mk, batch, d, device=w.device, dtype=w.dtype)
            for n, g in enumerate(generators):
                e[n].normal_(generator=g)
            eps.append(e)
        return eps

    def log_weights(self, x: Tensor, eps: List[Tensor], need_bar: bool = False,
                    need_score: bool = False) -> LogWeights:
        """x [N, B, x_dim], eps from draw_eps → lw [N, M·K, B] (and lw_bar, log_q_score, as VAE.log_weights)."""
        h: Tensor = x
        log_q: Any = 0.0
        log_q_bar: Any = 0.0
        log_q_score: Any = 0.0
        zs: List[Tensor] = []
        for i, layer in enumerate(self.encoder):
            mu, logsig = layer(h)
            if i == 0:  # the first layer runs once per example: broadcast over the samples
                mu, logsig = mu.unsqueeze(1), logsig.unsqueeze(1)
            e = eps[i]
            z = mu + torch.exp(logsig) * e
            log_q = log_q + (-0.5 * e ** 2 - logsig - HALF_LOG_2PI).sum(-1)
            if need_bar:
                if i == 0:
                    mu_s, logsig_s = mu.detach(), logsig.detach()
                else:
                    frozen = {n: p.detach() for n, p in layer.named_parameters()}
                    mu_s, logsig_s = functional_call(layer, frozen, (h,))
                log_q_bar = log_q_bar + gaussian_log_prob(z, mu_s, logsig_s)
            if need_score:  # every z stopped, the parameters live (vaexp.models.base)
                mu_f, logsig_f = (mu, logsig) if i == 0 else layer(h.detach())
                log_q_score = log_q_score + gaussian_log_prob(z.detach(), mu_f, logsig_f)
            zs.append(z)
            h = z
        log_p = bernoulli_log_lik(x.unsqueeze(1), self.decoder[0](zs[0]))
        for i in range(1, len(zs)):
            mu, logsig = self.decoder[i](zs[i])
            log_p = log_p + gaussian_log_prob(zs[i - 1], mu, logsig)
        log_p = log_p + std_normal_log_prob(zs[-1])
        return LogWeights(log_p - log_q, log_p - log_q_bar if need_bar else None, zs,
                          log_q_score if need_score else None)
