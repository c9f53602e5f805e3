"""The models, by config name: the one list that conf/model/*.yaml and the checks agree with.

Every model follows the protocol in vaexp.models.base; ``build_model`` makes the one a config
names for a dataset (its input size, and the training mean for a Bernoulli output bias).
"""
from __future__ import annotations

from typing import Callable, Dict

from torch import nn

from vaexp.models.burda import VAE
from vaexp.models.gaussian import LinearGaussianVAE


def _burda(cfg, data) -> nn.Module:
    return VAE.from_config(cfg, data.train.shape[1], data.train_mean)


def _gaussian(cfg, data) -> nn.Module:
    return LinearGaussianVAE.from_config(cfg, data.train.shape[1])


# config name -> builder(model cfg, dataset). burda1 and burda2 are one family with two shapes.
MODELS: Dict[str, Callable] = {"burda1": _burda, "burda2": _burda, "gaussian": _gaussian}


def build_model(cfg, data) -> nn.Module:
    return MODELS[cfg.name](cfg, data)
