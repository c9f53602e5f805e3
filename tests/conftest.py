"""Shared fixtures for the CLI / trainer tests: tiny run settings, an in-process `vaexp`, and a
subprocess `vaexp`, both kept away from the user's data cache and the working directory."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import pytest

# A run that takes seconds on a CPU: 100 training images (5 steps of 20), 20 test images, K=10.
TINY_DATA = ["dataset=synthetic", "dataset.n_train=120", "dataset.n_valid=20", "dataset.n_test=20"]
TINY_RUN = TINY_DATA + ["schedule=quick", "schedule.epochs=1", "eval.k=10", "eval.au_samples=4",
                        "progress=false", "batch_size=20"]
TINY_BURDA1 = ["model=burda1", "model.latents=[4]", "model.hidden=[8]"]
TINY_BURDA2 = ["model=burda2", "model.latents=[4,3]", "model.hidden=[8,6]"]


class CliResult(NamedTuple):
    code: int
    out: str
    err: str


@pytest.fixture(scope="session")
def tiny_args() -> tuple:
    """Overrides for a one-epoch tiny run with a one-layer model (add out_root / hydra.run.dir)."""
    return tuple(TINY_RUN + TINY_BURDA1)


@pytest.fixture(scope="session")
def tiny_args_2layer() -> tuple:
    """Like tiny_args, with two stochastic layers (burda2 shape)."""
    return tuple(TINY_RUN + TINY_BURDA2)


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch.set_num_threads(1) for a module (see cli_env), restored afterwards."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    """VAEXP_DATA_DIR in a temp folder (nothing touches the user cache); no test hooks set."""
    d = tmp_path / "vaexp-data"
    monkeypatch.setenv("VAEXP_DATA_DIR", str(d))
    # In-process `vaexp` calls set up the pytest process (vaexp.runtime.setup): one fixed thread,
    # no thread governor (see cli_env for why one thread).
    monkeypatch.setenv("VAEXP_THREADS", "1")
    monkeypatch.delenv("VAEXP_INTERRUPT_AT_STEP", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    return d


def cli_env(data_dir: Path, **extra: str) -> dict:
    env = dict(os.environ)
    env.pop("VAEXP_INTERRUPT_AT_STEP", None)
    env.pop("HYDRA_FULL_ERROR", None)
    env["VAEXP_DATA_DIR"] = str(data_dir)
    env["PYTHONUNBUFFERED"] = "1"
    # One intra-op thread: tiny models gain nothing from more, and on a busy 2-core runner
    # OpenMP threads spinning against each other make every step ~100x slower.
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def run_cli(args: Sequence[str], cwd: Path, data_dir: Path, env: Optional[dict] = None,
            timeout: float = 300) -> CliResult:
    """`python -m vaexp <args>` in a fresh process."""
    proc = subprocess.run([sys.executable, "-m", "vaexp", *args], cwd=str(cwd), capture_output=True,
                          text=True, timeout=timeout, env=env or cli_env(data_dir))
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def cli(tmp_path, data_dir):
    """Run `python -m vaexp ...` as a subprocess in tmp_path; returns CliResult(code, out, err)."""

    def call(*args: str, env_extra: Optional[dict] = None, cwd: Optional[Path] = None,
             timeout: float = 300) -> CliResult:
        return run_cli([str(a) for a in args], cwd or tmp_path, data_dir,
                       env=cli_env(data_dir, **(env_extra or {})), timeout=timeout)

    return call


def run_main(args: Sequence[str]) -> int:
    """`vaexp <args>` in this process; returns the exit status (0 when main returns).

    Hydra keeps global state (GlobalHydra) and configures logging for every job: both are put
    back afterwards, so calls do not leak into each other.
    """
    from hydra.core.global_hydra import GlobalHydra

    from vaexp.cli import main

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    argv = list(sys.argv)
    GlobalHydra.instance().clear()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        for h in handlers:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(level)
    return code


@pytest.fixture
def vaexp_main(data_dir, capsys):
    """Run `vaexp ...` in this process (fast: no interpreter start); returns CliResult."""

    def call(*args: str) -> CliResult:
        capsys.readouterr()
        code = run_main(args)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return call


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished tiny run (TINY_RUN + TINY_BURDA1), once per test module; copy it (run_copy)
    before changing it."""
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VAEXP_DATA_DIR", str(root / "data"))
        mp.delenv("VAEXP_INTERRUPT_AT_STEP", raising=False)
        assert run_main(["train", *TINY_RUN, *TINY_BURDA1, f"hydra.run.dir={root / 'run'}"]) == 0
    return root / "run"


@pytest.fixture
def run_copy(trained, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst
