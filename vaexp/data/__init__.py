"""Datasets by config name: the one list that conf/dataset/*.yaml and the checks agree with.

``load_dataset(cfg, device)`` returns a vaexp.data.base.Dataset on `device` (see there for the
invariants every dataset keeps); each loader takes (name, cfg, device).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Union

import torch

from vaexp.data.base import DataError, Dataset, binarize, default_data_dir
from vaexp.data.extra import load_binarized_mnist_dataset, load_omniglot_dataset
from vaexp.data.gaussian import load_gaussian
from vaexp.data.mnist import load_mnist
from vaexp.data.synthetic import load_synthetic

__all__ = ["DATASETS", "DataError", "Dataset", "binarize", "default_data_dir", "load_dataset"]

DATASETS: Dict[str, Callable[[str, Any, Any], Dataset]] = {
    "mnist": load_mnist,
    "fashion_mnist": load_mnist,
    "omniglot": load_omniglot_dataset,
    "binarized_mnist": load_binarized_mnist_dataset,
    "synthetic": load_synthetic,
    "gaussian": load_gaussian,
}


def load_dataset(cfg: Any, device: Union[torch.device, str]) -> Dataset:
    """The dataset named by cfg.name, split and binarised, on `device`."""
    loader = DATASETS.get(cfg.name)
    if loader is None:
        raise DataError(f"dataset.name={cfg.name}: unknown dataset; choose one of {', '.join(DATASETS)}")
    return loader(cfg.name, cfg, torch.device(device))
