"""vaexp: an experiment runner for importance-weighted variational autoencoders."""

from vaexp import runtime as _runtime

# Before torch's first matmul in the process: MKL fixes its reproducibility mode then.
_runtime.ask_strict_gemm()

__version__ = "0.1.0"
