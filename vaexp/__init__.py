"""vaexp: an experiment runner for importance-weighted variational autoencoders."""

__version__ = "0.1.0"
