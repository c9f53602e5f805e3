"""Small generated 28x28 images (strokes and blobs): offline smoke runs and tests.

Invariant: prototypes, training and test images come from separate streams of dataset.seed, so
the test set does not change with n_train.
"""
from __future__ import annotations

from typing import Any, Tuple

import numpy as np

from vaexp.data.base import PIXELS, Dataset, PixelSplits, setting, split, to_unit


def load_synthetic(name: str, cfg: Any, device) -> Dataset:
    raw, source = synthetic_raw(setting(cfg, "n_train", 2000), setting(cfg, "n_test", 500), setting(cfg, "seed", 0))
    return split(name, to_unit(raw["train"]), to_unit(raw["test"]), cfg, device, source)


SYNTHETIC_PROTOTYPES = 10


def synthetic_raw(n_train: int, n_test: int, seed: int) -> Tuple[PixelSplits, str]:
    """Stroke-and-blob 28x28 images as uint8: 10 prototypes, each example shifted and noised.

    Separate random streams for prototypes, train and test, so the test set does not change
    with n_train.
    """
    proto_ss, train_ss, test_ss = np.random.SeedSequence(seed).spawn(3)
    protos = _synthetic_prototypes(np.random.default_rng(proto_ss))
    raw = {"train": _synthetic_examples(protos, n_train, np.random.default_rng(train_ss)),
           "test": _synthetic_examples(protos, n_test, np.random.default_rng(test_ss))}
    return raw, f"synthetic (seed={seed}, {SYNTHETIC_PROTOTYPES} prototypes)"


def _synthetic_prototypes(rng: np.random.Generator) -> np.ndarray:
    """[P, 28, 28] ink in [0, 1]: 1-3 strokes or blobs per prototype, inside the central 20x20."""
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float64)
    protos = np.zeros((SYNTHETIC_PROTOTYPES, 28, 28))
    for p in range(SYNTHETIC_PROTOTYPES):
        for _ in range(rng.integers(1, 4)):
            if rng.random() < 0.7:  # a stroke: distance to a segment, soft edge one pixel wide
                a, b = rng.uniform(5, 22, size=2), rng.uniform(5, 22, size=2)
                ab = b - a
                t = np.clip(((yy - a[0]) * ab[0] + (xx - a[1]) * ab[1]) / max(ab @ ab, 1e-9), 0, 1)
                dist = np.hypot(yy - a[0] - t * ab[0], xx - a[1] - t * ab[1])
                ink = np.clip(rng.uniform(1.0, 2.0) - dist + 0.5, 0, 1)
            else:  # a blob: a filled ellipse
                c, r = rng.uniform(8, 19, size=2), rng.uniform(2, 5, size=2)
                rad = np.hypot((yy - c[0]) / r[0], (xx - c[1]) / r[1])
                ink = np.clip((1 - rad) * 3 + 0.5, 0, 1)
            protos[p] = np.maximum(protos[p], ink)
    return protos


def _synthetic_examples(protos: np.ndarray, n: int, rng: np.random.Generator, shift: int = 2) -> np.ndarray:
    """uint8 [n, 784]: a random prototype, shifted by up to `shift` pixels, with gray noise and flips."""
    padded = np.pad(protos.astype(np.float32), ((0, 0), (shift, shift), (shift, shift)))
    which = rng.integers(len(protos), size=n)
    dy, dx = rng.integers(0, 2 * shift + 1, size=(2, n))
    rows = dy[:, None] + np.arange(28)[None, :]
    cols = dx[:, None] + np.arange(28)[None, :]
    ink = padded[which[:, None, None], rows[:, :, None], cols[:, None, :]]
    ink = np.clip(ink + 0.05 * rng.standard_normal(ink.shape, dtype=np.float32), 0, 1)
    flips = rng.random(ink.shape, dtype=np.float32) < 0.01
    ink = np.where(flips, 1 - ink, ink)
    intensity = 0.02 + 0.96 * ink  # near 0/1, never exactly, like anti-aliased digits
    return np.rint(intensity * 255).astype(np.uint8).reshape(n, PIXELS)
