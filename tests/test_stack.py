"""Stacked training (vaexp.training.step.StackedStep, vaexp.cli.stacking): N runs trained as one stacked model compute what the N runs compute alone (to
float tolerance), and a `-m stack=true` sweep leaves the run directories separate runs leave."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vaexp import rundir
from vaexp.estimators import get_estimator
from vaexp.models.burda import VAE
from vaexp.models.stacked import StackedVAE
from vaexp.objectives import make_objective
from vaexp.training.step import (StackedStep, StepSpec, adam, model_optimizer_state, stack_key,
                                 stack_optimizer_states, train_step)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCHEDULE = SimpleNamespace(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-4)
CPU = torch.device("cpu")
# Every objective and estimator, with M*K = 4; two runs share (iwae, reparam, 1, 4) so they are
# reduced together, and the groups are not in model order.
# Two runs of one spec make a group of the stacked step: iwae's (M = 1) and miwae's (M > 1, where
# a group's view must keep M and K apart).
MEMBERS = [StepSpec("iwae", "reparam", 1, 4), StepSpec("miwae", "dreg", 2, 2), StepSpec("piwae", "stl", 2, 2),
           StepSpec("iwae", "reparam", 1, 4), StepSpec("ciwae", "dreg", 4, 1, 0.3), StepSpec("vae", "stl", 1, 4),
           StepSpec("miwae", "dreg", 2, 2)]
# The rest of the family (vaexp.estimators), with M*K = 4 and the jackknife objective; vimco and rws
# need log q at the stopped samples, which the stacked model gives only when some run asks for it.
NEW_MEMBERS = [StepSpec("iwae", "rws", 1, 4), StepSpec("miwae", "rws_dreg", 2, 2), StepSpec("jvi", "dreg", 1, 4),
               StepSpec("piwae", "vimco", 2, 2), StepSpec("miwae", "gdreg", 2, 2, alpha=0.3),
               StepSpec("iwae", "dreg_norm", 1, 4), StepSpec("jvi", "vimco", 1, 4),
               StepSpec("iwae", "rws_dreg_norm", 1, 4), StepSpec("miwae", "gdreg", 2, 2, alpha=0.8)]


def tiny_vae(seed: int, latents=(3, 2), hidden=(6, 5), x_dim=12, dtype=torch.float32) -> VAE:
    torch.manual_seed(seed)
    return VAE(list(latents), list(hidden), x_dim=x_dim, train_mean=torch.linspace(0.1, 0.9, x_dim)).to(dtype)


# In float64 the stacked and the lone computations agree to ~1e-12: the maths is the same, and in
# float32 they differ only by rounding (batched vs plain matmuls), which Adam's normalisation
# amplifies for near-zero gradients to ~1e-6 of a parameter over a few steps.
@pytest.mark.parametrize("latents,hidden,dtype,tol", [((3,), (6,), torch.float64, 1e-10),
                                                      ((3, 2), (6, 5), torch.float64, 1e-10),
                                                      ((3, 2), (6, 5), torch.float32, 2e-5)])
@pytest.mark.parametrize("members", [MEMBERS, NEW_MEMBERS], ids=["original", "new"])
def test_stacked_steps_equal_separate_runs(latents, hidden, dtype, tol, members):
    n = len(members)
    lone = [tiny_vae(i, latents, hidden, dtype=dtype) for i in range(n)]
    stack = StackedVAE([tiny_vae(i, latents, hidden, dtype=dtype) for i in range(n)])
    opt = adam(stack.parameters(), SCHEDULE, CPU)
    step = StackedStep(stack, members, opt, [torch.Generator().manual_seed(100 + i) for i in range(n)])
    lone_opts = [adam(m.parameters(), SCHEDULE, CPU) for m in lone]
    lone_gens = [torch.Generator().manual_seed(100 + i) for i in range(n)]
    data = torch.Generator().manual_seed(7)
    for _ in range(4):
        x = (torch.rand(n, 5, 12, generator=data) < 0.5).to(dtype)  # every run its own batch
        out = step(x)
        assert out.shape == (n, 4) and not out.requires_grad
        for i, (mb, model) in enumerate(zip(members, lone)):
            alone = train_step(model, make_objective(mb.objective, mb.beta), get_estimator(mb.estimator, mb.alpha),
                               lone_opts[i], model.theta_parameters(), model.phi_parameters(), x[i], mb.m, mb.k,
                               lone_gens[i])
            assert torch.allclose(out[i], alone, rtol=tol, atol=tol), (i, mb, out[i], alone)
    copies = [tiny_vae(0, latents, hidden, dtype=dtype) for _ in range(n)]
    stack.copy_to(copies)
    for i, (a, b) in enumerate(zip(copies, lone)):
        for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
            assert torch.allclose(pa, pb, rtol=0, atol=tol), (i, name, (pa - pb).abs().max())
    # The runs really differ (else the comparison above would prove little).
    assert not torch.allclose(copies[0].decoder[0].logits.weight, copies[3].decoder[0].logits.weight)


def test_eps_are_each_runs_own_draws():
    stack = StackedVAE([tiny_vae(i) for i in range(3)])
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    eps = stack.draw_eps(gens, mk=6, batch=4)
    for i, s in enumerate((5, 6, 7)):
        twin = torch.Generator().manual_seed(s)
        first = torch.randn((2, 3, 4, 3), generator=twin)  # as VAE.log_weights draws them: layer 0, then 1
        second = torch.randn((2, 3, 4, 2), generator=twin)
        assert torch.equal(eps[0][i], first.reshape(6, 4, 3)) and torch.equal(eps[1][i], second.reshape(6, 4, 2))


def test_vae_log_weights_with_supplied_eps_is_the_same_computation():
    model = tiny_vae(0)
    x = (torch.rand(4, 12) < 0.5).float()
    g, twin = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    drawn = model.log_weights(x, 2, 3, need_bar=True, generator=g)
    eps = [torch.randn((2, 3, 4, 3), generator=twin), torch.randn((2, 3, 4, 2), generator=twin)]
    given = model.log_weights(x, 2, 3, need_bar=True, eps=eps)
    assert torch.equal(drawn.lw, given.lw) and torch.equal(drawn.lw_bar, given.lw_bar)
    # The stacked model's log-weights of a one-model stack are the model's own.
    stacked = StackedVAE([model]).log_weights(x.unsqueeze(0), [e.reshape(1, 6, 4, -1) for e in eps], need_bar=True)
    assert torch.allclose(stacked.lw[0], drawn.lw.reshape(6, 4), atol=1e-4)
    assert torch.allclose(stacked.lw_bar[0], drawn.lw_bar.reshape(6, 4), atol=1e-4)


def test_optimizer_state_round_trip_through_lone_adams():
    n = 3
    stack = StackedVAE([tiny_vae(i) for i in range(n)])
    opt = adam(stack.parameters(), SCHEDULE, CPU)
    step = StackedStep(stack, [StepSpec("iwae", "dreg", 1, 4)] * n, opt, [torch.Generator().manual_seed(i) for i in range(n)])
    for _ in range(2):
        step((torch.rand(n, 5, 12) < 0.5).float())
    named = list(stack.named_parameters())
    models = [tiny_vae(0) for _ in range(n)]
    stack.copy_to(models)
    states = []
    for i, model in enumerate(models):
        template = adam(model.parameters(), SCHEDULE, CPU).state_dict()
        sd = model_optimizer_state(opt, named, i, template)
        lone = adam(model.parameters(), SCHEDULE, CPU)
        lone.load_state_dict(sd)  # a lone run's Adam takes it as its own
        for j, p in enumerate(model.parameters()):
            assert lone.state[p]["exp_avg"].shape == p.shape
            assert float(lone.state[p]["step"]) == 2.0
        states.append(sd)
    again = StackedVAE(models)
    opt2 = adam(again.parameters(), SCHEDULE, CPU)
    stack_optimizer_states(opt2, list(again.named_parameters()), states)
    for (_, p), (_, q) in zip(named, again.named_parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], opt2.state[q][key])
        assert torch.equal(p, q)


def test_stack_key_says_which_runs_stack():
    from omegaconf import OmegaConf

    from vaexp.schema import TrainConfig

    def cfg(**kw):
        base = OmegaConf.merge(OmegaConf.structured(TrainConfig), {
            "dataset": {"name": "synthetic"}, "model": {"name": "burda1"}, "objective": {"name": "iwae"},
            "estimator": {"name": "reparam"}, "schedule": {"name": "quick"}, "eval": {}})
        return OmegaConf.merge(base, kw)

    a = stack_key(cfg())
    assert a == stack_key(cfg(seed=3, estimator={"name": "dreg"}, eval={"k": 10}))
    assert a == stack_key(cfg(objective={"name": "miwae"}, m=5, k=1))           # M*K = 5 as well
    assert a != stack_key(cfg(k=6))                                             # another M*K
    assert a != stack_key(cfg(batch_size=10)) and a != stack_key(cfg(schedule={"lr": 1e-4}))
    assert a != stack_key(cfg(model={"hidden": [100]}))
    assert stack_key(cfg(model={"name": "gaussian"})) is None                  # only the Bernoulli VAEs


# ------------------------------------------------------------------------------ from the CLI

def _runs(sweep_dir: Path):
    return {d.name: d for d in sorted(sweep_dir.iterdir()) if d.is_dir()}


def _params(run: Path):
    return rundir.load_checkpoint(run)["model"]


@pytest.fixture
def tiny_sweep(tmp_path, tiny_args):
    def args(name: str, *extra: str):
        return ["train", "-m", *tiny_args, "schedule.epochs=2", "log_every=2", f"out_root={tmp_path / 'out'}",
                f"sweep={name}", *extra]

    return args


def test_stacked_sweep_matches_separate_runs(tiny_sweep, tmp_path, vaexp_main):
    grid = ["seed=0,1", "estimator=reparam,dreg"]
    assert vaexp_main(*tiny_sweep("alone", *grid)).code == 0
    result = vaexp_main(*tiny_sweep("stacked", "stack=true", *grid))
    assert result.code == 0, result.err
    assert "training 4 runs as one stacked model" in result.out
    alone, stacked = _runs(tmp_path / "out/multirun/alone"), _runs(tmp_path / "out/multirun/stacked")
    assert set(alone) == set(stacked) and len(alone) == 4  # the same job directories (stack= not in the name)
    for name, run in stacked.items():
        files = {p.name for p in run.iterdir() if not p.name.startswith("events.")}
        assert files == {p.name for p in alone[name].iterdir() if not p.name.startswith("events.")}
        assert any(p.name.startswith("events.") for p in run.iterdir())
        ours, theirs = json.loads((run / "metrics.json").read_text()), json.loads((alone[name] / "metrics.json").read_text())
        assert abs(ours["test"]["nll"] - theirs["test"]["nll"]) < 1e-3, name
        assert abs(ours["train"]["bound"] - theirs["train"]["bound"]) < 1e-3, name
        assert len(ours["train"]["stacked_with"]) == 3
        for key, value in _params(run).items():  # float32 rounding, amplified by Adam (see above)
            assert torch.allclose(value, _params(alone[name])[key], atol=1e-4), (name, key)
    # A stacked run is an ordinary run: `vaexp eval` and resume=<dir> work as on any other.
    run = stacked[sorted(stacked)[-1]]
    steps_before = json.loads((run / "metrics.json").read_text())["train"]["steps"]
    assert vaexp_main("eval", str(run), "progress=false").code == 0
    twin = alone[run.name]
    outs = []
    for r in (run, twin):
        res = vaexp_main("train", f"resume='{r}'", "schedule.epochs=3", "progress=false")
        assert res.code == 0, res.err
        outs.append(res.out)
    a, b = json.loads((run / "metrics.json").read_text()), json.loads((twin / "metrics.json").read_text())
    assert a["train"]["epochs"] == 3 and abs(a["test"]["nll"] - b["test"]["nll"]) < 1e-3, outs
    # Resumed alone, the run no longer names a stack, but keeps on record the one it was trained in.
    assert "stacked_with" not in a["train"] and "stack_changes" not in b["train"]
    others = sorted(n for n in stacked if n != run.name)
    (change,) = a["train"]["stack_changes"]
    assert change["step"] == steps_before and [sorted(c) for c in change["stacked_with"]] == [others, []], change


def nan_for_model_1_from_step_7(monkeypatch) -> None:
    """From the stack's 7th step (epoch 2: 5 steps per epoch) on, model 1's bound reads NaN."""
    real_call = StackedStep.__call__
    calls = {"n": 0}

    def call(self, x):
        calls["n"] += 1
        out = real_call(self, x)
        if calls["n"] >= 7:
            out = out.clone()
            out[1, 0] = float("nan")
        return out

    monkeypatch.setattr(StackedStep, "__call__", call)


def test_a_diverging_run_fails_alone_and_the_stack_goes_on(tiny_sweep, tmp_path, vaexp_main, monkeypatch):
    nan_for_model_1_from_step_7(monkeypatch)
    result = vaexp_main(*tiny_sweep("nan", "stack=true", "seed=0,1,2"))
    assert result.code != 0  # the sweep reports the failed job
    runs = sorted(_runs(tmp_path / "out/multirun/nan").values(), key=lambda d: d.name)
    bad = runs[1]
    assert "seed=1" in bad.name
    assert "training bound became nan" in (bad / "error.txt").read_text()
    assert not (bad / "metrics.json").exists()
    assert rundir.load_checkpoint(bad)["state"]["epoch"] == 1  # the last good checkpoint (epoch 1)
    for good in (runs[0], runs[2]):
        assert json.loads((good / "metrics.json").read_text())["train"]["epochs"] == 2


def test_interrupted_stack_resumes_stacked_exactly(tiny_sweep, tmp_path, vaexp_main, monkeypatch):
    assert vaexp_main(*tiny_sweep("whole", "stack=true", "seed=0,1")).code == 0
    monkeypatch.setenv("VAEXP_INTERRUPT_AT_STEP", "7")
    assert vaexp_main(*tiny_sweep("cut", "stack=true", "seed=0,1")).code == 130
    cut = _runs(tmp_path / "out/multirun/cut")
    assert all(rundir.load_checkpoint(d)["state"]["global_step"] == 7 for d in cut.values())
    monkeypatch.delenv("VAEXP_INTERRUPT_AT_STEP")
    result = vaexp_main(*tiny_sweep("cut", "stack=true", "seed=0,1"))
    assert result.code == 0 and "training 2 runs as one stacked model" in result.out
    whole = _runs(tmp_path / "out/multirun/whole")
    for name, run in cut.items():
        for key, value in _params(run).items():
            assert torch.allclose(value, _params(whole[name])[key], atol=1e-6), (name, key)
        train = json.loads((run / "metrics.json").read_text())["train"]  # resumed in the same stack: no change
        assert "stack_changes" not in train and train["stacked_with"] == [n for n in cut if n != name], train


def test_stacked_sweep_of_the_new_estimators_with_diagnostics(tiny_sweep, tmp_path, vaexp_main):
    """rws / vimco / gdreg on iwae and jvi, stacked (one M*K), with the gradient diagnostics on: each
    job is what it is alone (its own run compared), and every job logs its own diagnostics."""
    # (few overrides: Hydra names a job directory after all of them, and a name has at most 255 bytes)
    grid = ["estimator=rws,vimco,gdreg", "objective=iwae,jvi", "diagnostics.every=4"]
    result = vaexp_main(*tiny_sweep("family", "stack=true", *grid))
    assert result.code == 0, result.err
    assert "training 6 runs as one stacked model" in result.out
    runs = _runs(tmp_path / "out/multirun/family")
    assert len(runs) == 6
    (name,) = [n for n in runs if "estimator=vimco" in n and "objective=jvi" in n]
    alone = vaexp_main("train", *tiny_sweep("x")[2:-1], "estimator=vimco", "objective=jvi",
                       f"out_root={tmp_path / 'alone'}")
    assert alone.code == 0, alone.err
    (solo,) = (tmp_path / "alone/train").iterdir()
    ours = json.loads((runs[name] / "metrics.json").read_text())
    theirs = json.loads((solo / "metrics.json").read_text())
    assert abs(ours["train"]["jvi_estimate"] - theirs["train"]["jvi_estimate"]) < 1e-3
    # float32 rounding (batched vs plain matmuls), amplified by Adam's normalisation of near-zero
    # gradient components into steps of up to lr = 1e-3 each (10 steps here; vimco's score
    # gradients are the noisiest): well below one step
    for key, value in _params(runs[name]).items():
        assert torch.allclose(value, _params(solo)[key], atol=5e-4), (key, (value - _params(solo)[key]).abs().max())
    from tensorboard.backend.event_processing import event_accumulator as ea

    for run in runs.values():
        acc = ea.EventAccumulator(str(run))
        acc.Reload()
        est = [p.split("=")[1] for p in run.name.split(",") if p.startswith("estimator=")][0]
        assert [e.step for e in acc.Scalars(f"diag/phi_{est}/variance")] == [4, 8]


# ------------------------------------------------------------------------------ jobs sharing a directory, faults

@pytest.mark.parametrize("stack", ["stack=true", "stack=false"])
def test_jobs_that_would_share_a_directory_with_other_settings_are_refused(tiny_sweep, tmp_path, vaexp_main, stack):
    """Named without the setting they differ in, two runs would meet in one directory: stacked, both
    trained into it (the dreg run's checkpoint over the reparam run's evaluation); alone, the second
    refused after the first had filled it, with the sweep summed up as finished. Refused up front."""
    res = vaexp_main(*tiny_sweep("shared", stack, "seed=0", "estimator=reparam,dreg", "hydra.sweep.subdir=seed${seed}"))
    assert res.code == 2, res.out + res.err
    assert "would both run in" in res.err and "estimator.name=reparam vs dreg" in res.err and "nothing was run" in res.err
    assert "Traceback" not in res.err and not (tmp_path / "out" / "multirun" / "shared").exists()


def test_stacked_jobs_that_differ_in_runtime_settings_alone_are_one_run(tiny_sweep, tmp_path, vaexp_main):
    """log_every is not in a job's name: seed=0,1 log_every=1,2 is two runs; each is trained once,
    by its first job (with that job's settings), and the other job finds it finished."""
    res = vaexp_main(*tiny_sweep("once", "stack=true", "seed=0,1", "log_every=1,2"))
    assert res.code == 0, res.err
    assert "training 2 runs as one stacked model" in res.out and res.out.count("already finished") == 2, res.out
    runs = _runs(tmp_path / "out/multirun/once")
    assert len(runs) == 2
    for run in runs.values():
        assert "log_every: 1\n" in (run / "config.yaml").read_text()
        assert len([p for p in run.iterdir() if p.name.startswith("events.")]) == 1
        metrics = json.loads((run / "metrics.json").read_text())
        assert len(metrics["evals"]) == 1 and len(metrics["train"]["stacked_with"]) == 1


def interrupt_at_call(monkeypatch, module, name: str, n: int):
    """`module.name` raises KeyboardInterrupt (Ctrl-C) at its n-th call; returns the real one."""
    real, calls = getattr(module, name), {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupted)
    return real


def test_a_stack_interrupted_in_its_final_evaluation_has_recorded_every_runs_training(
        tiny_sweep, tmp_path, vaexp_main, monkeypatch):
    from vaexp import evaluate

    real = interrupt_at_call(monkeypatch, evaluate, "evaluate", 2)
    res = vaexp_main(*tiny_sweep("evki", "stack=true", "seed=0,1,2"))
    assert res.code == 130, res.err
    runs = sorted(_runs(tmp_path / "out/multirun/evki").values(), key=lambda d: d.name)
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["run"]["state"] == "trained" and metrics["train"]["epochs"] == 2, run.name
    assert "test" in json.loads((runs[0] / "metrics.json").read_text())
    monkeypatch.setattr(evaluate, "evaluate", real)
    res = vaexp_main("report", tmp_path / "out/multirun/evki", "plots=false")
    assert res.code == 0 and "vaexp eval" in res.out, res.out
    # Resumed alone only to be evaluated, a trained run trains in no stack: its record stays the stack's.
    res = vaexp_main("train", f"resume='{runs[1]}'", "progress=false")
    assert res.code == 0 and "evaluating" in res.out, res.out + res.err
    metrics = json.loads((runs[1] / "metrics.json").read_text())
    assert "test" in metrics and metrics["train"]["stacked_with"] == [runs[0].name, runs[2].name], metrics["train"]
    assert "stack_changes" not in metrics["train"]


def test_an_interrupted_stack_says_which_run_diverged(tiny_sweep, tmp_path, vaexp_main, monkeypatch):
    nan_for_model_1_from_step_7(monkeypatch)
    monkeypatch.setenv("VAEXP_INTERRUPT_AT_STEP", "9")
    res = vaexp_main(*tiny_sweep("nanint", "stack=true", "seed=0,1,2"))
    assert res.code == 130, res.err
    runs = sorted(_runs(tmp_path / "out/multirun/nanint").values(), key=lambda d: d.name)
    assert "the checkpoints of the 2 stacked runs are saved" in res.err, res.err
    assert f"{runs[1]} diverged: training bound became nan" in res.err, res.err
    assert [rundir.load_checkpoint(d)["state"]["global_step"] for d in runs] == [9, 5, 9]


def test_a_stack_interrupted_while_it_starts_removes_the_directories_it_made(tiny_sweep, tmp_path, vaexp_main,
                                                                             monkeypatch):
    from vaexp.training import loop

    interrupt_at_call(monkeypatch, loop, "open_run", 3)
    res = vaexp_main(*tiny_sweep("kistart", "stack=true", "seed=0,1,2"))
    assert res.code == 130, res.err
    sweep = tmp_path / "out/multirun/kistart"
    left = [d for d in _runs(sweep).values()]
    assert len(left) <= 1 and all("seed=0" in d.name for d in left), left  # at most the running job's own, as alone
