"""TensorBoard output of a run: scalars, image grids, and hparams for comparing sweeps."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import Tensor


def image_grid(images: Tensor, shape, cols: Optional[int] = None, pad: int = 1) -> Tensor:
    """[N, H*W] in [0,1] -> [1, rows*(H+pad)+pad, cols*(W+pad)+pad] for add_image (CHW)."""
    h, w = shape
    n = images.shape[0]
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = torch.ones(rows * (h + pad) + pad, cols * (w + pad) + pad)
    imgs = images.detach().float().cpu().reshape(n, h, w)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = imgs[i]
    return grid.unsqueeze(0)


class RunLogger:
    """A SummaryWriter in the run directory. `purge_step` drops events written after the
    checkpoint we resume from, so curves have no duplicated tails."""

    def __init__(self, run_dir: Path, purge_step: Optional[int] = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)

    def scalars(self, values: Dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def images(self, tag: str, images: Tensor, shape, step: int, cols: Optional[int] = None) -> None:
        self.writer.add_image(tag, image_grid(images, shape, cols), step, dataformats="CHW")

    def hparams(self, hparams: Dict, metrics: Dict[str, float]) -> None:
        """Write the hparams summary into this run's own event file (not a sub-run), so one
        TensorBoard over a sweep shows a table of every run with its final metrics."""
        from torch.utils.tensorboard.summary import hparams as hp_summary

        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        exp, ssi, sei = hp_summary(clean, metrics)
        fw = self.writer._get_file_writer()
        for summary in (exp, ssi, sei):
            fw.add_summary(summary)
        for key, value in metrics.items():
            self.writer.add_scalar(key, value)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
