"""Learning-rate schedules as a list of (epoch -> lr).

Stage i (0-based) runs `stage_epochs` epochs, or epochs_base**i when that is null, at
lr * lr_decay**i. Burda et al.: 8 stages, base 3, decay 10^(-1/7): 3,280 epochs in all.
`epochs` caps the total, or extends the last stage when it asks for more.
"""
from __future__ import annotations

from typing import List


def epoch_learning_rates(cfg) -> List[float]:
    lrs: List[float] = []
    for i in range(cfg.stages):
        n = cfg.stage_epochs if cfg.stage_epochs is not None else cfg.epochs_base ** i
        lrs += [cfg.lr * cfg.lr_decay ** i] * n
    if cfg.epochs is not None:
        lrs = lrs[: cfg.epochs] + [lrs[-1]] * max(0, cfg.epochs - len(lrs))
    return lrs
