"""Atomic checkpoints: everything needed to continue a run exactly where it stopped."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch

CHECKPOINT = "checkpoint.pt"


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over `path`.

    A crash or kill at any moment leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def rng_states(generators: Dict[str, torch.Generator]) -> Dict[str, Any]:
    states = {name: g.get_state() for name, g in generators.items()}
    states["torch_cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        states["torch_cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Dict[str, Any], generators: Dict[str, torch.Generator]) -> None:
    for name, g in generators.items():
        g.set_state(states[name])
    torch.set_rng_state(states["torch_cpu"])
    if "torch_cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch_cuda"])


def load(run_dir: Path, map_location="cpu") -> Optional[Dict[str, Any]]:
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    return torch.load(path, map_location=map_location, weights_only=False)
