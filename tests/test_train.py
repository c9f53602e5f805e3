"""The trainer: exact resume after an interruption (hook, in-process signal, real SIGINT and
SIGKILL), non-finite bounds, and unit checks of the schedule, atomic checkpoints, per-epoch
binarisation and the train step."""
from __future__ import annotations

import errno
import math
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest
import torch

import vaexp.training.loop
import vaexp.training.step
from conftest import TINY_BURDA1, TINY_BURDA2, TINY_DATA, cli_env, run_main
from vaexp import rundir
from vaexp.data import binarize, load_dataset
from vaexp.estimators import get_estimator
from vaexp.models.burda import VAE
from vaexp.objectives import make_objective
from vaexp.schedule import epoch_learning_rates
from vaexp.training.run import epoch_seed
from vaexp.training.step import train_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMMON = TINY_DATA + ["schedule=quick", "eval.k=10", "eval.au_samples=4", "progress=false", "batch_size=20"]
# Two stochastic layers, DReG, M > 1: every piece of state a resume has to restore is in play.
RESUME_ARGS = COMMON + TINY_BURDA2 + ["objective=miwae", "m=2", "estimator=dreg", "schedule.epochs=2"]
STEPS_PER_EPOCH = 5  # 100 training images, batch 20


def load_ckpt(run_dir: Path) -> dict:
    return torch.load(Path(run_dir) / "checkpoint.pt", map_location="cpu", weights_only=False)


def assert_same_training_state(a: dict, b: dict) -> None:
    """Bit-for-bit the same model, optimizer, RNG and schedule position (wall time aside)."""
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    oa, ob = a["optimizer"], b["optimizer"]
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys() and len(oa["state"]) == len(a["model"])
    for idx in oa["state"]:
        assert oa["state"][idx].keys() == ob["state"][idx].keys()
        for key in oa["state"][idx]:
            assert torch.equal(torch.as_tensor(oa["state"][idx][key]), torch.as_tensor(ob["state"][idx][key])), (idx, key)
    for gen in ("eps", "eval"):
        assert torch.equal(a["rng"][gen], b["rng"][gen]), gen
    sa = {k: v for k, v in a["state"].items() if k != "wall_time"}
    sb = {k: v for k, v in b["state"].items() if k != "wall_time"}
    assert sa.keys() == sb.keys()
    for key in sa:
        if isinstance(sa[key], torch.Tensor):
            assert torch.equal(sa[key], sb[key]), key
        else:
            assert sa[key] == sb[key], key  # history holds the per-epoch train/valid bounds


def metrics(run_dir: Path) -> dict:
    import json

    return json.loads((Path(run_dir) / "metrics.json").read_text())


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce exactly."""
    root = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VAEXP_DATA_DIR", str(root / "data"))
        mp.delenv("VAEXP_INTERRUPT_AT_STEP", raising=False)
        assert run_main(["train", *RESUME_ARGS, f"hydra.run.dir={root / 'run'}"]) == 0
    ck = load_ckpt(root / "run")
    assert ck["state"]["global_step"] == 2 * STEPS_PER_EPOCH
    return root / "run"


# --------------------------------------------------------------------------- 5a. deterministic interruption

def test_interrupt_hook_then_resume_is_exact(reference_run, cli, vaexp_main, tmp_path):
    run_dir = tmp_path / "run"
    # Step 7 of 10: mid-way through the second epoch, so the resume crosses nothing but
    # has to rebuild epoch 2's binarisation and permutation and continue its bound sums.
    res = cli("train", *RESUME_ARGS, f"hydra.run.dir={run_dir}", env_extra={"VAEXP_INTERRUPT_AT_STEP": "7"})
    assert res.code == 130, res.err
    assert "Traceback" not in res.out + res.err
    assert f"resume={run_dir}" in res.err
    assert not (run_dir / "metrics.json").exists()
    st = load_ckpt(run_dir)["state"]
    assert (st["global_step"], st["epoch"], st["step"]) == (7, 1, 2)
    assert len(st["history"]) == 1

    res = vaexp_main("train", f"resume={run_dir}", "progress=false")
    assert res.code == 0, res.err
    assert "resuming" in res.out
    assert_same_training_state(load_ckpt(run_dir), load_ckpt(reference_run))
    ma, mb = metrics(run_dir), metrics(reference_run)
    assert ma["test"] == mb["test"]
    assert ma["train"]["bound"] == mb["train"]["bound"]
    assert ma["train"]["steps"] == mb["train"]["steps"] == 10


def test_a_resumed_run_logs_the_same_tensorboard_points(cli, vaexp_main, tmp_path):
    """The sums since the last TensorBoard point are in the checkpoint: interrupted at step 7 with
    log_every=3, the resumed run logs step 9 as the mean of steps 7-9, as the uninterrupted one."""
    from vaexp.report import read_curves

    ref, run_dir = tmp_path / "ref", tmp_path / "run"
    tags = ("train/bound", "train/grad_norm_theta")
    assert vaexp_main("train", *RESUME_ARGS, "log_every=3", f"hydra.run.dir={ref}").code == 0
    res = cli("train", *RESUME_ARGS, "log_every=3", f"hydra.run.dir={run_dir}", env_extra={"VAEXP_INTERRUPT_AT_STEP": "7"})
    assert res.code == 130, res.err
    assert vaexp_main("train", f"resume={run_dir}", "progress=false").code == 0
    want, got = read_curves(ref, tags), read_curves(run_dir, tags)
    assert [s for s, _ in want["train/bound"]] == [3, 6, 9]
    assert got == want


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fast", ["false", "true"])
def test_interrupt_then_resume_on_cuda_is_exact(cli, vaexp_main, tmp_path, fast):
    """Its random-number states go back to the CPU byte tensors that set_state takes (a GPU copy
    raised TypeError on every resume), and an eager Adam's step counts stay on the host (on the
    GPU each step would read them back). With fast=true the resumed run captures a new graph."""
    ref, run_dir = tmp_path / "ref", tmp_path / "run"
    assert vaexp_main("train", *RESUME_ARGS, "device=cuda", f"fast={fast}", f"hydra.run.dir={ref}").code == 0
    res = cli("train", *RESUME_ARGS, "device=cuda", f"fast={fast}", f"hydra.run.dir={run_dir}",
              env_extra={"VAEXP_INTERRUPT_AT_STEP": "7"})
    assert res.code == 130, res.err
    res = vaexp_main("train", f"resume={run_dir}", "progress=false")
    assert res.code == 0, res.err
    assert_same_training_state(load_ckpt(run_dir), load_ckpt(ref))
    assert metrics(run_dir)["test"] == metrics(ref)["test"]
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=False)  # where it was, not moved
    assert all(s["step"].device.type == "cpu" for s in saved["optimizer"]["state"].values())


def test_resume_from_another_devices_checkpoint_reseeds_with_a_warning(reference_run, vaexp_main, tmp_path):
    """README lets device change on resume; a CUDA generator's state (16 bytes) cannot go into a
    CPU generator (5056): a new stream from (seed, step), said in one warning, not a crash."""
    from vaexp.training.run import reseed_on_new_device, restore_rng_states

    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    ck = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    ck["rng"]["eps"] = torch.zeros(16, dtype=torch.uint8)  # what a CUDA generator's get_state() returns
    torch.save(ck, run_dir / "checkpoint.pt")
    gens = {"eps": torch.Generator(), "eval": torch.Generator()}
    assert restore_rng_states(ck["rng"], gens) == ["eps"]
    assert torch.equal(gens["eval"].get_state(), ck["rng"]["eval"])
    assert reseed_on_new_device(0, 10, "eps") != reseed_on_new_device(0, 11, "eps") != 0
    with pytest.warns(RuntimeWarning, match="written on another device.*not bit for bit"):
        res = vaexp_main("train", f"resume={run_dir}", "schedule.epochs=3", "progress=false")
    assert res.code == 0, res.err
    assert load_ckpt(run_dir)["state"]["epoch"] == 3


@pytest.mark.parametrize("signal_at_call", [3, 5], ids=["mid-epoch-1", "last-step-of-epoch-1"])
def test_sigint_during_a_step_then_resume_is_exact(signal_at_call, reference_run, vaexp_main, tmp_path,
                                                   monkeypatch):
    """SIGINT arriving inside a step (in this process, so exactly when we want): the step
    finishes, the checkpoint holds it, and the resumed run equals the uninterrupted one."""
    real_step, calls = vaexp.training.step.train_step, []

    def step_then_signal(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == signal_at_call:
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(vaexp.training.step, "train_step", step_then_signal)
    run_dir = tmp_path / "run"
    res = vaexp_main("train", *RESUME_ARGS, f"hydra.run.dir={run_dir}")
    assert res.code == 130, res.err
    assert f"resume={run_dir}" in res.err
    st = load_ckpt(run_dir)["state"]
    assert st["global_step"] == signal_at_call
    assert (st["epoch"], st["step"]) == (0, signal_at_call)  # the epoch's end-of-epoch work still to do

    res = vaexp_main("train", f"resume={run_dir}", "progress=false")
    assert res.code == 0, res.err
    assert len(calls) == 2 * STEPS_PER_EPOCH  # no step repeated, none skipped
    assert_same_training_state(load_ckpt(run_dir), load_ckpt(reference_run))
    assert metrics(run_dir)["test"] == metrics(reference_run)["test"]


# --------------------------------------------------------------------------- 5b. real signals

def _start(args: List[str], cwd: Path, data_dir: Path, out: Path) -> subprocess.Popen:
    with open(out / "stdout.txt", "w") as so, open(out / "stderr.txt", "w") as se:
        return subprocess.Popen([sys.executable, "-m", "vaexp", *args], cwd=str(cwd), stdout=so, stderr=se,
                                env=cli_env(data_dir))


def _wait_for(path: Path, proc: subprocess.Popen, out: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"vaexp exited ({proc.returncode}) before writing {path.name}:\n"
                        f"{(out / 'stdout.txt').read_text()}\n{(out / 'stderr.txt').read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {path.name} after {timeout} s")
        time.sleep(0.01)


def test_real_sigint_then_resume(tmp_path, data_dir, vaexp_main):
    epochs = 40  # the signal comes right after epoch 1, long before the last one
    run_dir = tmp_path / "run"
    args = ["train", *COMMON, *TINY_BURDA1, f"schedule.epochs={epochs}", f"hydra.run.dir={run_dir}"]
    proc = _start(args, tmp_path, data_dir, tmp_path)
    try:
        _wait_for(run_dir / "checkpoint.pt", proc, tmp_path)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = (tmp_path / "stderr.txt").read_text()
    assert code == 130, err
    assert "resume=" in err and str(run_dir) in err
    assert "Traceback" not in err
    st = load_ckpt(run_dir)["state"]
    assert STEPS_PER_EPOCH <= st["global_step"] < epochs * STEPS_PER_EPOCH
    assert st["global_step"] == st["epoch"] * STEPS_PER_EPOCH + st["step"]
    assert not (run_dir / "metrics.json").exists()

    res = vaexp_main("train", f"resume={run_dir}", "progress=false")
    assert res.code == 0, res.err
    final = load_ckpt(run_dir)["state"]
    assert final["global_step"] == epochs * STEPS_PER_EPOCH and final["epoch"] == epochs
    assert len(final["history"]) == epochs
    assert metrics(run_dir)["train"]["steps"] == epochs * STEPS_PER_EPOCH


def test_sigkill_leaves_a_loadable_checkpoint(tmp_path, data_dir, vaexp_main):
    epochs = 30
    run_dir = tmp_path / "run"
    args = ["train", *COMMON, *TINY_BURDA1, f"schedule.epochs={epochs}", f"hydra.run.dir={run_dir}"]
    proc = _start(args, tmp_path, data_dir, tmp_path)
    try:
        _wait_for(run_dir / "checkpoint.pt", proc, tmp_path)
        # Kill while it keeps writing checkpoints (one per epoch): whatever moment it dies in,
        # checkpoint.pt must be a whole file.
        first = (run_dir / "checkpoint.pt").stat().st_mtime_ns
        deadline = time.monotonic() + 60
        while (run_dir / "checkpoint.pt").stat().st_mtime_ns == first and time.monotonic() < deadline \
                and proc.poll() is None:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()
    saved = rundir.load_checkpoint(run_dir)
    st = saved["state"]
    assert 1 <= st["epoch"] < epochs and st["global_step"] == st["epoch"] * STEPS_PER_EPOCH + st["step"]
    assert saved["model"] and all(torch.isfinite(v).all() for v in saved["model"].values())

    res = vaexp_main("train", f"resume={run_dir}", "progress=false")
    assert res.code == 0, res.err
    final = load_ckpt(run_dir)["state"]
    assert final["global_step"] == epochs * STEPS_PER_EPOCH
    assert metrics(run_dir)["train"]["epochs"] == epochs


# --------------------------------------------------------------------------- 6. non-finite bounds

@pytest.mark.parametrize("log_every", [200, 2], ids=["checked-at-epoch-end", "checked-at-log-step"])
def test_non_finite_bound_stops_and_keeps_last_checkpoint(log_every, vaexp_main, tmp_path, monkeypatch):
    real_step, calls, at_first_nan = vaexp.training.step.train_step, [], {}
    run_dir = tmp_path / "run"

    def nan_from_step_7(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) >= 7:
            if not at_first_nan:
                at_first_nan["bytes"] = (run_dir / "checkpoint.pt").read_bytes()
            return torch.full_like(out, float("nan"))
        return out

    monkeypatch.setattr(vaexp.training.step, "train_step", nan_from_step_7)
    res = vaexp_main("train", *COMMON, *TINY_BURDA1, "schedule.epochs=3", f"log_every={log_every}",
                     f"hydra.run.dir={run_dir}")
    assert res.code not in (0, 130)
    assert "Traceback" not in res.out + res.err
    assert "nan" in res.err and "checkpoint" in res.err and str(run_dir) in res.err
    assert "after 5 steps" in res.err  # the checkpoint that is kept: the end of epoch 1
    assert "schedule.lr" in res.err
    assert (run_dir / "checkpoint.pt").read_bytes() == at_first_nan["bytes"]
    assert load_ckpt(run_dir)["state"]["global_step"] == STEPS_PER_EPOCH
    assert not (run_dir / "metrics.json").exists()
    assert len(calls) == (10 if log_every == 200 else 8)  # stops at the first check after the NaN


def test_diverging_run_without_checkpoint(vaexp_main, tmp_path):
    """A real divergence (Adam with lr=1e30 overflows at once) before any checkpoint exists."""
    run_dir = tmp_path / "run"
    res = vaexp_main("train", *COMMON, *TINY_BURDA1, "schedule.epochs=2", "schedule.lr=1e30",
                     f"hydra.run.dir={run_dir}")
    assert res.code not in (0, 130)
    assert "Traceback" not in res.out + res.err
    assert "checkpoint" in res.err and "schedule.lr" in res.err
    assert "no checkpoint" in res.err  # and it must not claim to have kept one
    assert not (run_dir / "checkpoint.pt").exists()
    assert not (run_dir / "metrics.json").exists()


# --------------------------------------------------------------------------- 8. units

def compose_train(overrides: List[str]):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from vaexp.cli.configs import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="vaexp.conf", version_base="1.3"):
            return compose(config_name="train", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def test_burda_schedule():
    lrs = epoch_learning_rates(compose_train(["schedule=burda"]).schedule)
    assert len(lrs) == 3280 == sum(3 ** i for i in range(8))
    start = 0
    for i in range(8):
        stage = lrs[start:start + 3 ** i]
        assert len(stage) == 3 ** i
        assert all(lr == pytest.approx(1e-3 * 10 ** (-i / 7), rel=1e-12) for lr in stage), i
        start += 3 ** i
    assert lrs[-1] == pytest.approx(1e-4, rel=1e-12)


def test_schedule_cap_and_extension():
    full = epoch_learning_rates(compose_train(["schedule=burda"]).schedule)
    capped = epoch_learning_rates(compose_train(["schedule=burda", "schedule.epochs=10"]).schedule)
    assert capped == full[:10]
    assert capped == [full[0]] + [full[1]] * 3 + [full[4]] * 6
    longer = epoch_learning_rates(compose_train(["schedule=burda", "schedule.epochs=4000"]).schedule)
    assert len(longer) == 4000 and longer[:3280] == full and set(longer[3280:]) == {full[-1]}
    quick = epoch_learning_rates(compose_train(["schedule=quick"]).schedule)
    assert quick == [1e-3] * 3
    assert epoch_learning_rates(compose_train(["schedule=quick", "schedule.epochs=5"]).schedule) == [1e-3] * 5
    constant = epoch_learning_rates(compose_train(["schedule=constant", "schedule.lr=3e-4"]).schedule)
    assert constant == [3e-4] * 100


def test_atomic_save_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    rundir.atomic_save({"version": 1, "w": torch.arange(3)}, path)
    old_bytes = path.read_bytes()
    real_save = torch.save

    def half_then_crash(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        rundir.atomic_save({"version": 2}, path)
    assert path.read_bytes() == old_bytes
    assert torch.load(path, weights_only=False)["version"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temp file left

    monkeypatch.setattr(torch, "save", real_save)
    rundir.atomic_save({"version": 2}, path)
    assert torch.load(path, weights_only=False)["version"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


class _FullDisk(io.FileIO):
    """A file on a disk that fills up after 200 bytes."""

    def write(self, b):
        if self.tell() + len(b) > 200:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(b)


def test_atomic_save_on_a_full_disk_is_a_full_disk(tmp_path, monkeypatch):
    """torch.save reports the failed write as its own RuntimeError ('unexpected pos'); the run
    must say 'no space left' and name the checkpoint, not report a bug."""
    from vaexp.errors import fault_line
    from vaexp.rundir import files

    obj = {"w": torch.zeros(10_000)}
    with pytest.raises(RuntimeError), _FullDisk(tmp_path / "raw.pt", "wb") as f:
        torch.save(obj, f)  # the behaviour worked around (if torch raised the OSError itself, fine too)
    path = tmp_path / "checkpoint.pt"
    rundir.atomic_save({"version": 1}, path)
    monkeypatch.setattr(files, "open", lambda p, mode: _FullDisk(p, mode), raising=False)
    with pytest.raises(OSError) as info:
        rundir.atomic_save(obj, path)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    line, code = fault_line(info.value)
    assert code == 2 and line.startswith(f"no space left on the device for {path}")
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["version"] == 1  # the old checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "raw.pt"]


def test_atomic_save_failing_rename_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    rundir.atomic_save({"version": 1}, path)

    def no_rename(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError):
        rundir.atomic_save({"version": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["version"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    cfg = compose_train(TINY_DATA).dataset
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VAEXP_DATA_DIR", str(tmp_path_factory.mktemp("data")))
        return load_dataset(cfg, "cpu")


def test_epoch_binarisation_is_fresh_per_epoch_and_reproducible(synthetic):
    probs = synthetic.train
    assert ((probs > 0) & (probs < 1)).float().mean() > 0.5  # intensities, not already binary

    def draw(seed, epoch):
        return binarize(probs, torch.Generator().manual_seed(epoch_seed(seed, epoch)))

    e0, e1 = draw(0, 0), draw(0, 1)
    assert set(e0.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(e0, e1)
    assert torch.equal(e0, draw(0, 0))
    assert not torch.equal(e0, draw(1, 0))
    assert len({epoch_seed(s, e) for s in range(20) for e in range(500)}) == 20 * 500


def test_trainer_binarises_each_epoch_from_its_seed(vaexp_main, tmp_path, monkeypatch, synthetic):
    seen = []
    real = vaexp.training.loop.binarize

    def recording(probs, generator):
        out = real(probs, generator)
        seen.append(out.clone())
        return out

    monkeypatch.setattr(vaexp.training.loop, "binarize", recording)
    res = vaexp_main("train", *COMMON, *TINY_BURDA1, "schedule.epochs=2", "seed=3",
                     f"hydra.run.dir={tmp_path / 'run'}")
    assert res.code == 0, res.err
    assert len(seen) == 2
    for epoch, x in enumerate(seen):
        expected = binarize(synthetic.train, torch.Generator().manual_seed(epoch_seed(3, epoch)))
        assert torch.equal(x, expected), epoch
    assert not torch.equal(seen[0], seen[1])


@pytest.mark.parametrize("objective,estimator,m,k", [("iwae", "reparam", 1, 5), ("piwae", "dreg", 2, 3),
                                                     ("vae", "stl", 2, 2)])
def test_train_step(objective, estimator, m, k):
    torch.manual_seed(0)
    x = (torch.rand(20, 784) < 0.3).float()
    model = VAE([4, 3], [8, 6], x_dim=784, train_mean=x.mean(0))
    obj, est = make_objective(objective, 0.5), get_estimator(estimator)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    theta, phi = model.theta_parameters(), model.phi_parameters()
    before = [p.detach().clone() for p in theta + phi]
    gen = torch.Generator().manual_seed(5)
    twin = torch.Generator().manual_seed(5)
    with torch.no_grad():
        lw = model.log_weights(x, m, k, generator=twin).lw  # the same ε the step will draw

    out = train_step(model, obj, est, opt, theta, phi, x, m, k, gen)

    assert isinstance(out, torch.Tensor) and out.shape == (4,) and out.device == x.device
    assert not out.requires_grad
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0], obj.theta(lw).mean(), rtol=1e-6, atol=1e-4)
    assert torch.allclose(out[1], obj.phi(lw).mean(), rtol=1e-6, atol=1e-4)
    if objective == "piwae":
        assert out[0] >= out[1]  # iwae over all M*K samples >= mean of M iwae bounds
    assert out[2] > 0 and out[3] > 0
    changed = [not torch.equal(b, p.detach()) for b, p in zip(before, theta + phi)]
    assert any(changed[:len(theta)]) and any(changed[len(theta):])  # both networks take a step
    assert all(p.grad is not None for p in theta + phi)


def test_the_step_gets_the_configured_beta_and_alpha():
    """ciwae's β and gdreg's α reach the objective and the estimator the step optimises with
    (vaexp.training.step.spec_of), not their defaults: the recorded config alone would not show it."""
    from omegaconf import OmegaConf

    from vaexp.training.step import spec_of

    cfg = OmegaConf.create({"objective": {"name": "ciwae"}, "estimator": {"name": "gdreg", "alpha": 0.3},
                            "beta": 0.2, "m": 2, "k": 3})
    spec = spec_of(cfg)
    assert (spec.objective, spec.estimator, spec.m, spec.k, spec.beta, spec.alpha) == ("ciwae", "gdreg", 2, 3, 0.2, 0.3)
    lw = torch.tensor([[[0.0], [-1.0], [-3.0]], [[-2.0], [-0.5], [-4.0]]])  # [M=2, K=3, B=1]
    want = 0.2 * lw.mean((0, 1)) + 0.8 * (torch.logsumexp(lw, 1) - math.log(3)).mean(0)
    torch.testing.assert_close(make_objective(spec.objective, spec.beta).theta(lw), want)
    assert get_estimator(spec.estimator, spec.alpha).alpha == 0.3
