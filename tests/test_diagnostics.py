"""Gradient diagnostics during training (vaexp.training.diagnostics): the logged statistics equal a
plain loop over the same draws through the trainer's own path; off, the loop does no extra work;
on or off, the training is bit for bit the same; bad settings are refused before any directory."""
from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

import vaexp.gradstats
import vaexp.training.diagnostics as diagnostics
from conftest import TINY_BURDA2, TINY_DATA
from test_train import assert_same_training_state, load_ckpt
from vaexp.estimators import get_estimator, gradients, surrogate_losses
from vaexp.models.burda import VAE
from vaexp.objectives import make_objective
from vaexp.tblog import RunLogger

pytestmark = pytest.mark.usefixtures("one_torch_thread")
F64 = torch.float64


def _cfg(**diag):
    return OmegaConf.create({
        "m": 2, "k": 3, "seed": 4, "beta": 0.3, "objective": {"name": "miwae"},
        "estimator": {"name": "dreg", "alpha": None},
        "diagnostics": {"every": 1, "draws": 40, "estimators": ["stl", "dreg", "rws", "vimco", "gdreg"],
                        "alpha": 0.3, "batch": 3, "chunk": 40, **diag}})


def _model_and_data():
    torch.manual_seed(0)
    model = VAE([3, 2], [5, 4], x_dim=6).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = (torch.rand(7, 6, generator=torch.Generator().manual_seed(1)) < 0.5).to(F64)
    return model, x


def _direct(model, x, cfg, global_step, monkeypatch):
    """The draws one at a time through the trainer's path (log_weights, surrogate_losses,
    gradients), ε fed as vmap draws them (one [R, M, K, B, D_i] block per layer, from the
    diagnostics' own seed), then the statistics from their definitions."""
    d = cfg.diagnostics
    names = list(d.estimators) + ["reparam"]
    ests = [get_estimator(n, d.alpha if n == "gdreg" else None) for n in names]
    obj = make_objective(cfg.objective.name, cfg.beta)
    xb = x[: d.batch]
    gen = torch.Generator().manual_seed(diagnostics.diagnostics_seed(cfg.seed, global_step))
    eps = [torch.randn((d.draws, cfg.m, cfg.k, xb.shape[0], dim), generator=gen, dtype=F64) for dim in model.latents]
    real = torch.randn
    theta, phi = [], {n: [] for n in names}
    for r in range(d.draws):
        for name, est in zip(names, ests):
            queue = [e[r] for e in eps]
            monkeypatch.setattr(torch, "randn", lambda *a, **kw: queue.pop(0))
            lws = model.log_weights(xb, cfg.m, cfg.k, need_bar=est.needs_lw_bar, need_score=est.needs_score)
            monkeypatch.setattr(torch, "randn", real)
            gt, gp = gradients(surrogate_losses(obj, est, lws.lw, lws.lw_bar, lws.log_q_score),
                               model.theta_parameters(), model.phi_parameters())
            if name == names[0]:
                theta.append(torch.cat([g.reshape(-1) for g in gt]))
            phi[name].append(torch.cat([g.reshape(-1) for g in gp]))

    def stats(g, ref=None):
        g = torch.stack(g)
        mean, var = g.mean(0), g.var(0)
        snr = mean.abs() / var.sqrt()
        snr = snr[torch.isfinite(snr)]
        out = {"variance": var.mean().item(), "snr_median": snr.median().item(),
               "snr_ratio": math.sqrt((mean ** 2).mean().item() / var.mean().item())}
        if ref is not None:
            diff = g - torch.stack(ref)
            out["bias_z"] = math.sqrt(d.draws * (diff.mean(0) ** 2).sum().item() / diff.var(0).sum().item())
        return out

    want = {f"diag/theta/{k}": v for k, v in stats(theta).items()}
    for name in d.estimators:
        want.update({f"diag/phi_{name}/{k}": v for k, v in stats(phi[name], phi["reparam"]).items()})
    want.update({f"diag/phi_reparam/{k}": v for k, v in stats(phi["reparam"]).items()})
    return want


@pytest.mark.parametrize("chunk", [40, 0])
def test_logged_statistics_equal_a_direct_loop_over_draws(chunk, monkeypatch):
    model, x = _model_and_data()
    cfg = _cfg(chunk=chunk)
    before = [p.detach().clone() for p in model.parameters()]
    got = diagnostics.Diagnostics(cfg, x, torch.device("cpu")).measure(model, global_step=12)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # read, not changed
    assert got.pop("diag/seconds") > 0
    if chunk == 0:  # auto-sized passes draw the same ε only when they are one pass: compare loosely
        assert set(got) == set(_direct(model, x, _cfg(chunk=40), 12, monkeypatch))
        return
    want = _direct(model, x, cfg, 12, monkeypatch)
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-9), key
    assert got["diag/phi_dreg/bias_z"] < 4 and got["diag/phi_vimco/bias_z"] < 4  # unbiased: z of order 1


def test_the_hook_logs_them_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator as ea

    model, x = _model_and_data()
    cfg = _cfg()

    class FakeRun:
        def __init__(self):
            self.cfg, self.model, self.log = cfg, model, RunLogger(tmp_path)

    class NoSync:
        def sync(self, models):
            pass

    run = FakeRun()
    hook = diagnostics.loop_diagnostics([run], x, torch.device("cpu"))
    assert hook.every == 1
    hook(NoSync(), [run], [0], 12)
    run.log.close()
    acc = ea.EventAccumulator(str(tmp_path))
    acc.Reload()
    want = diagnostics.Diagnostics(cfg, x, torch.device("cpu")).measure(model, 12)
    for key, value in want.items():
        (event,) = acc.Scalars(key)
        assert event.step == 12
        if key != "diag/seconds":
            assert event.value == pytest.approx(value, rel=1e-6), key  # TensorBoard stores float32


def test_the_runs_own_estimator_by_default():
    model, x = _model_and_data()
    cfg = _cfg(estimators=[])
    cfg.estimator = {"name": "gdreg", "alpha": 0.9}
    d = diagnostics.Diagnostics(cfg, x, torch.device("cpu"))
    assert d.names == ["gdreg"] and d.estimators[0].alpha == 0.9 and d.estimators[-1].name == "reparam"
    assert diagnostics.loop_diagnostics([type("R", (), {"cfg": _cfg(every=None)})()], x, "cpu") is None


# -- in the trainer ----------------------------------------------------------------------------------------

ARGS = TINY_DATA + TINY_BURDA2 + ["schedule=quick", "schedule.epochs=2", "eval.k=10", "eval.au_samples=4",
                                  "progress=false", "batch_size=20", "objective=miwae", "m=2", "k=2",
                                  "estimator=vimco", "log_every=3"]


def _run(vaexp_main, out, *extra):
    res = vaexp_main("train", *ARGS, f"out_root={out}", *extra)
    assert res.code == 0, res.err
    (run,) = (out / "train").iterdir()
    return run


def test_training_is_bit_for_bit_the_same_with_and_without_diagnostics(vaexp_main, tmp_path, monkeypatch):
    on = _run(vaexp_main, tmp_path / "on", "diagnostics.every=3", "diagnostics.draws=8",
              "diagnostics.estimators=[reparam,dreg,rws]")

    def forbidden(*a, **kw):
        raise AssertionError("diagnostics are off: no gradient draws, no diagnostics object")

    monkeypatch.setattr(vaexp.gradstats.GradientSampler, "draw", forbidden)
    monkeypatch.setattr(diagnostics.Diagnostics, "__init__", forbidden)
    off = _run(vaexp_main, tmp_path / "off")
    assert_same_training_state(load_ckpt(on), load_ckpt(off))
    a, b = json.loads((on / "metrics.json").read_text()), json.loads((off / "metrics.json").read_text())
    assert a["test"]["nll"] == b["test"]["nll"] and a["train"]["bound"] == b["train"]["bound"]

    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(on))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("diag/phi_rws/bias_z")]
    assert steps == [3, 6, 9]  # every 3 of the 10 steps
    assert {"diag/theta/snr_median", "diag/phi_dreg/variance", "diag/phi_reparam/snr_ratio",
            "diag/seconds"} <= set(acc.Tags()["scalars"])
    assert "diag/phi_reparam/bias_z" not in acc.Tags()["scalars"]
    off_acc = ea.EventAccumulator(str(off))
    off_acc.Reload()
    assert not any(t.startswith("diag/") for t in off_acc.Tags()["scalars"])


def test_a_resume_may_switch_diagnostics_on(vaexp_main, tmp_path):
    run = _run(vaexp_main, tmp_path / "out")
    res = vaexp_main("train", f"resume='{run}'", "schedule.epochs=3", "diagnostics.every=5", "diagnostics.draws=4",
                     "progress=false")
    assert res.code == 0, res.err


BAD = [
    (["diagnostics.every=0"], ["diagnostics.every=0", ">= 1"]),
    (["diagnostics.every=2", "diagnostics.draws=1"], ["diagnostics.draws=1"]),
    (["diagnostics.every=2", "diagnostics.estimators=[foo]"], ["unknown estimator foo"]),
    (["diagnostics.every=2", "diagnostics.estimators=[rws]", "objective=vae", "estimator=dreg"],
     ["diagnostics.estimators=[...rws...] with objective=vae", "plain mean"]),
    (["diagnostics.every=2", "dataset.n_valid=0"], ["dataset.n_valid=0", "validation"]),
    (["diagnostics.every=2", "dataset.n_valid=20", "diagnostics.batch=50"], ["diagnostics.batch=50 with dataset.n_valid=20",
                                                                          "diagnostics.batch <= 20"]),
    (["diagnostics.every=2", "diagnostics.alpha=1.5"], ["diagnostics.alpha=1.5"]),
]


@pytest.mark.parametrize("overrides,words", BAD)
def test_bad_diagnostics_settings_are_refused_up_front(overrides, words, vaexp_main, tmp_path):
    out = tmp_path / "out"
    res = vaexp_main("train", *ARGS, *overrides, f"out_root={out}")
    assert res.code != 0 and "Traceback" not in res.out + res.err
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vaexp: "), res.err
    for word in words:
        assert word in lines[0], lines[0]
    assert not out.exists()
