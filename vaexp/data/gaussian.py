"""dataset=gaussian: real-valued draws from the linear-Gaussian model (vaexp.models.gaussian).

Invariants: μ_true ~ N(0, I) and the train / valid / test points come from separate streams of
dataset.seed (streams 0-3), point by point, so a larger split keeps its first points and no split
depends on another's size. float32, used as they are (not images: no binarisation, no pictures).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from vaexp.data.base import Dataset


def true_mean(dim: int, seed: int) -> Tensor:
    """μ_true ~ N(0, I), from its own stream of `seed` (fp64 [dim])."""
    return torch.from_numpy(np.random.default_rng(np.random.SeedSequence(seed).spawn(4)[0]).standard_normal(dim))


def sample_points(dim: int, n: int, seed: int, stream: int) -> Tensor:
    """n points of x = z + ε, z ~ N(μ_true, I), ε ~ N(0, I) (fp64 [n, dim]); streams 1-3 are
    train, valid and test, independent of each other's sizes. Point by point (z and ε together),
    so a larger n keeps the first points."""
    mu = true_mean(dim, seed).numpy()
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(4)[stream])
    noise = rng.standard_normal((n, 2, dim))
    return torch.from_numpy(mu + noise[:, 0] + noise[:, 1])


def load_gaussian(name: str, cfg: Any, device) -> Dataset:
    """dataset=gaussian: n_train training points (Rainforth et al.: N = 1024, the points that define
    the optimum μ* = their mean), plus n_valid validation and n_test test points drawn separately
    from the same true model (so the test NLL is on held-out data). float32, used as they are."""
    dim, seed = int(cfg.dim), int(cfg.seed)
    parts = [sample_points(dim, int(n), seed, s).to(torch.float32).to(device)
             for s, n in ((1, cfg.n_train), (2, cfg.n_valid), (3, cfg.n_test))]
    return Dataset(name="gaussian", train=parts[0], valid=parts[1], test=parts[2], image_shape=None,
                   source=f"gaussian (D={dim}, seed={seed}: mu_true ~ N(0, I), x ~ N(mu_true, 2I))",
                   binary=False)
