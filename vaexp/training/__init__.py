"""Training: the step (step.py), one run's state (run.py), THE loop (loop.py), the CUDA graph (capture.py)."""
