"""vaexp.fast (the captured training step) and the evaluation's forward passes.

The CUDA graph itself needs a GPU: those tests are skipped without one. On CPU the capture logic
(snapshot, warm-up, capture, verification against the eager step, fallback) runs against a
stand-in for the graph that replays the eager function, so what is checked here is that
everything around the graph leaves the run exactly where the eager step leaves it.
"""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from vaexp import evaluate as ev
from vaexp.training import capture as fast
from vaexp.estimators import get_estimator
from vaexp.models import dense
from vaexp.models.burda import VAE
from vaexp.models.stacked import StackedVAE
from vaexp.objectives import make_objective
from vaexp.training.step import StackedStep, StepSpec, adam, make_step, train_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCHEDULE = SimpleNamespace(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-4)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class GraphStandIn:
    """CUDAGraphBackend's interface on a CPU: 'capture' remembers the function (and, unlike a real
    capture, runs it once: the step must put back what that changed), 'replay' runs it again and
    writes the result into the static output."""

    def __init__(self, corrupt: float = 0.0, fail_capture: bool = False):
        self.corrupt, self.fail_capture, self.replays = corrupt, fail_capture, 0

    def new_graph(self, generators):
        return SimpleNamespace(fn=None, out=None)

    def warm_up(self, fn, steps):
        for _ in range(steps):
            fn()

    def capture(self, graph, fn):
        if self.fail_capture:
            raise RuntimeError("operation not permitted when stream is capturing")
        graph.fn = fn
        graph.out = fn().clone()
        return graph.out

    def replay(self, graph):
        self.replays += 1
        graph.out.copy_(graph.fn())
        if self.corrupt:
            with torch.no_grad():
                for p in self.params:
                    p.add_(self.corrupt)


def setup(seed=0, device="cpu", estimator="dreg", objective="miwae", m=2, k=3):
    torch.manual_seed(seed)
    model = VAE([4, 3], [8, 6], x_dim=20, train_mean=torch.linspace(0.1, 0.9, 20)).to(device)
    opt = adam(model.parameters(), SCHEDULE, torch.device(device))
    gen = torch.Generator(device=device).manual_seed(11)
    obj, est = make_objective(objective), get_estimator(estimator)
    theta, phi = model.theta_parameters(), model.phi_parameters()

    def step(x):
        return train_step(model, obj, est, opt, theta, phi, x, m, k, gen)

    return model, opt, gen, step


def batches(n, device="cpu"):
    g = torch.Generator().manual_seed(3)
    return [(torch.rand(10, 20, generator=g) < 0.4).float().to(device) for _ in range(n)]


def run_eager(pre_steps=0):
    model, opt, gen, step = setup()
    outs = [step(x).clone() for x in batches(pre_steps + 6)]
    return model, opt, gen, outs[pre_steps:]


@pytest.mark.parametrize("pre_steps", [0, 2])  # a fresh optimizer, and one with state (a resumed run)
def test_captured_step_leaves_the_run_where_the_eager_step_does(pre_steps):
    ref_model, ref_opt, ref_gen, ref_outs = run_eager(pre_steps)
    model, opt, gen, step = setup()
    xs = batches(pre_steps + 6)
    for x in xs[:pre_steps]:
        step(x)
    backend = GraphStandIn()
    captured = fast.CapturedStep(step, list(model.parameters()), opt, [gen], backend=backend)
    outs = [captured(x).clone() for x in xs[pre_steps:]]
    assert captured.captured and not captured.eager and backend.replays == 6
    for a, b in zip(outs, ref_outs):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], ref_opt.state[q][key])
    assert torch.equal(gen.get_state(), ref_gen.get_state())  # the same ε were drawn, no more


def test_a_graph_that_disagrees_is_dropped_for_the_eager_step():
    ref_model, _, _, ref_outs = run_eager()
    model, opt, gen, step = setup()
    backend = GraphStandIn(corrupt=1e-3)
    backend.params = list(model.parameters())
    captured = fast.CapturedStep(step, list(model.parameters()), opt, [gen], backend=backend)
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        outs = [captured(x).clone() for x in batches(6)]
    assert captured.eager and not captured.captured and "differs" in captured.reason
    for a, b in zip(outs, ref_outs):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)


def test_capture_errors_fall_back_under_auto_and_raise_under_true():
    ref_model, _, _, ref_outs = run_eager()
    model, opt, gen, step = setup()
    captured = fast.CapturedStep(step, list(model.parameters()), opt, [gen], backend=GraphStandIn(fail_capture=True))
    with pytest.warns(RuntimeWarning, match="operation not permitted"):
        outs = [captured(x).clone() for x in batches(6)]
    assert all(torch.equal(a, b) for a, b in zip(outs, ref_outs))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref_model.parameters()))

    model, opt, gen, step = setup()
    strict = fast.CapturedStep(step, list(model.parameters()), opt, [gen], strict=True,
                               backend=GraphStandIn(fail_capture=True))
    with pytest.raises(fast.CaptureError, match="fast=true"):
        strict(batches(1)[0])


def test_the_stacked_step_captures_too():
    n = 3

    def make():
        models = []
        for i in range(n):
            torch.manual_seed(i)
            models.append(VAE([4], [8], x_dim=20, train_mean=torch.linspace(0.1, 0.9, 20)))
        stack = StackedVAE(models)
        opt = adam(stack.parameters(), SCHEDULE, torch.device("cpu"))
        gens = [torch.Generator().manual_seed(i) for i in range(n)]
        return stack, opt, gens, StackedStep(stack, [StepSpec("iwae", "stl", 1, 4)] * n, opt, gens)

    g = torch.Generator().manual_seed(0)
    xs = [(torch.rand(n, 10, 20, generator=g) < 0.4).float() for _ in range(5)]
    ref_stack, _, _, ref_step = make()
    ref = [ref_step(x).clone() for x in xs]
    stack, opt, gens, step = make()
    captured = fast.CapturedStep(step, list(stack.parameters()), opt, gens, backend=GraphStandIn())
    assert all(torch.equal(captured(x), r) for x, r in zip(xs, ref))
    assert all(torch.equal(p, q) for p, q in zip(stack.parameters(), ref_stack.parameters()))


def test_learning_rate_and_checkpoint_format():
    model, opt, gen, step = setup()
    for x in batches(2):
        step(x)
    fast.set_lr(opt, 0.5)
    assert opt.param_groups[0]["lr"] == 0.5
    eager_sd = copy.deepcopy(opt.state_dict())  # (load_state_dict would share the state tensors)
    # What the captured step's optimizer looks like (capturable, lr a tensor); on a CPU Adam
    # cannot step in that form, but its checkpoint must come out in the eager format.
    fast.make_capturable(opt, torch.device("cpu"))
    group = opt.param_groups[0]
    assert group["capturable"] and torch.is_tensor(group["lr"]) and group["fused"] is None
    lr_tensor = group["lr"]
    fast.set_lr(opt, 0.25)
    assert opt.param_groups[0]["lr"] is lr_tensor and float(lr_tensor) == 0.25  # filled in place
    sd = copy.deepcopy(fast.portable_state_dict(opt))
    g = sd["param_groups"][0]
    assert g["lr"] == 0.25 and isinstance(g["lr"], float) and g["capturable"] is False
    assert all(s["step"].device.type == "cpu" for s in sd["state"].values())
    # A plain Adam takes it and continues like the original eager optimizer.
    twin, twin_opt, _, _ = setup()
    twin.load_state_dict(model.state_dict())
    twin_opt.load_state_dict(sd)
    ref, ref_opt, _, _ = setup()
    ref.load_state_dict(model.state_dict())
    ref_opt.load_state_dict(eager_sd)
    fast.set_lr(ref_opt, 0.25)
    for m, o in ((twin, twin_opt), (ref, ref_opt)):
        for p in m.parameters():
            p.grad = torch.ones_like(p)
        o.step()
    # (the captured form drops `fused`, so the two Adams may round differently)
    assert all(torch.allclose(p, q, rtol=0, atol=1e-6) for p, q in zip(twin.parameters(), ref.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(twin.parameters(), model.parameters()))  # it did step


def test_fast_setting():
    cpu = torch.device("cpu")
    assert not fast.wanted("auto", cpu) and not fast.wanted("false", cpu) and not fast.wanted(False, cpu)
    with pytest.raises(fast.CaptureError, match="needs a CUDA device"):
        fast.wanted(True, cpu)
    assert fast.mode("True") == "true" and fast.mode(False) == "false"
    assert fast.captured_step("auto", cpu, None, [], [], lambda x: x) is None


def test_fast_options_on_the_command_line(vaexp_main, tiny_args, tmp_path):
    bad = vaexp_main("train", *tiny_args, "fast=sometimes", f"out_root={tmp_path}")
    assert bad.code == 2 and "fast=sometimes" in bad.err and "fast=auto" in bad.err
    if not torch.cuda.is_available():
        forced = vaexp_main("train", *tiny_args, "fast=true", f"out_root={tmp_path}")
        assert forced.code == 2 and "fast=true" in forced.err and "CUDA" in forced.err
    assert not (tmp_path / "train").exists()  # rejected before anything is written


def _failing_at(step, call: int):
    """`step` itself, except that its `call`-th call raises as a failed compilation does."""
    import torch._dynamo.exc

    def candidate(x):
        candidate.calls.append(1)
        if len(candidate.calls) == call:
            raise torch._dynamo.exc.TorchDynamoException("recompiling failed")
        return step(x)

    candidate.calls = []
    return candidate


def test_a_run_records_where_its_fast_step_fell_back(vaexp_main, tiny_args, tmp_path, monkeypatch):
    """A fast step dropped during training (here a later compilation failing at the third step)
    warns and is kept in metrics.json as train.fast_fallbacks, with the steps done before it: the
    kernels record says only which forms were allowed, and the eager step rounds differently."""
    import json

    def fast_step(fast_setting, device, step, rows=None):
        return fast.CheckedStep(_failing_at(step, 3), step, step.params, step.opt, step.generators,
                                "compiled training step")

    monkeypatch.setattr(fast, "fast_step", fast_step)
    with pytest.warns(RuntimeWarning, match="compiled training step failed.*recompiling failed"):
        done = vaexp_main("train", *tiny_args, f"hydra.run.dir={tmp_path / 'run'}", "progress=false")
    assert done.code == 0, done.err
    train = json.loads((tmp_path / "run" / "metrics.json").read_text())["train"]
    assert train["fast_fallbacks"] == [{"step": 2, "reason": "TorchDynamoException: recompiling failed"}]
    monkeypatch.undo()
    assert vaexp_main("train", *tiny_args, f"hydra.run.dir={tmp_path / 'plain'}", "progress=false").code == 0
    assert "fast_fallbacks" not in json.loads((tmp_path / "plain" / "metrics.json").read_text())["train"]


# ------------------------------------------------------------------------------ evaluation passes

@pytest.mark.parametrize("latents,hidden", [([5], [16]), ([5, 3], [16, 8])])
def test_evaluation_passes_do_not_change_the_estimates(latents, hidden):
    torch.manual_seed(0)
    model = VAE(latents, hidden, x_dim=30, train_mean=torch.linspace(0.1, 0.9, 30)).eval()
    x = (torch.rand(23, 30) < 0.3).float()
    for k, rows in [(50, 200), (50, 30), (7, 1000)]:  # several blocks; pieces of K; one block
        ref = ev.log_likelihoods(model, x, k, [1, 4], rows, seed=3)  # one pass per drawn piece
        for pass_rows in [1, 5, 13, 64, 200, 1000, 10_000]:  # slices of blocks ... several blocks per pass
            out = ev.log_likelihoods(model, x, k, [1, 4], rows, seed=3, pass_rows=pass_rows)
            for key in ref:
                assert torch.allclose(out[key], ref[key], rtol=0, atol=1e-4), (k, rows, pass_rows, key)
    other_seed = ev.log_likelihoods(model, x, 50, [1], 200, seed=4, pass_rows=64)
    assert not torch.allclose(other_seed["log_px"], ref["log_px"])


def test_evaluate_uses_device_sized_passes(monkeypatch):
    seen = {}
    real = ev.log_likelihoods

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "log_likelihoods", spy)
    model = VAE([3], [8], x_dim=30).eval()
    cfg = SimpleNamespace(n_test=None, chunk=0, k=20, report_k=[1], seed=0, au_threshold=0.01, au_samples=2,
                          surgery_n=0)
    result = ev.evaluate(model, (torch.rand(6, 30) < 0.5).float(), cfg, torch.device("cpu"))
    assert seen["pass_rows"] == ev.CPU_PASS_ROWS and math.isfinite(result["metrics"]["nll"])


# ------------------------------------------------------------------------------ on a GPU

@needs_cuda
@pytest.mark.parametrize("objective,estimator,m,k", [("iwae", "reparam", 1, 5), ("miwae", "dreg", 2, 3),
                                                     ("piwae", "stl", 2, 2)])
def test_cuda_graph_step_matches_eager(objective, estimator, m, k):
    ref_model, ref_opt, ref_gen, ref_step = setup(device="cuda", objective=objective, estimator=estimator, m=m, k=k)
    fast.make_capturable(ref_opt, torch.device("cuda"))  # the same optimizer kernels, run eagerly
    model, opt, gen, step = setup(device="cuda", objective=objective, estimator=estimator, m=m, k=k)
    captured = fast.captured_step("true", torch.device("cuda"), opt, list(model.parameters()), [gen], step)
    for i, x in enumerate(batches(12, "cuda")):
        fast.set_lr(opt, 1e-2 / (1 + i))
        fast.set_lr(ref_opt, 1e-2 / (1 + i))
        assert torch.allclose(captured(x), ref_step(x), rtol=1e-4, atol=1e-4)
    assert captured.captured
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-5)
    assert torch.equal(gen.get_state(), ref_gen.get_state())


def _burda_step(device: str, n_models: int):
    """make_step of burda1 at MNIST's size, k=50 (so the likelihood's compiled kernels run), for one
    run or a stack of two with their own generators and estimators."""
    models = []
    for i in range(n_models):
        torch.manual_seed(i)
        models.append(VAE([50], [200], x_dim=784, train_mean=torch.full((784,), 0.13)).to(device))
    specs = [StepSpec("iwae", "reparam", 1, 50), StepSpec("iwae", "dreg", 1, 50)][:n_models]
    gens = [torch.Generator(device=device).manual_seed(20 + i) for i in range(n_models)]
    return make_step(models, specs, gens, [None] * n_models, SCHEDULE, torch.device(device))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("n_models", [1, 2])
def test_a_captured_burda_step_follows_the_eager_step(device, n_models):
    """Burda's model at MNIST's size (on CUDA the likelihood's compiled Triton kernels inside the
    graph), alone and stacked: the graph is kept (strict, as fast=true) and follows the eager
    step. On a CPU the stand-in backend checks the test itself."""
    from vaexp.models import likelihood as L

    dev = torch.device(device)
    ref, step = _burda_step(device, n_models), _burda_step(device, n_models)
    if device == "cuda":
        fast.make_capturable(ref.opt, dev)  # the same optimizer kernels, run eagerly
        captured = fast.fast_step("true", dev, step)
    else:
        captured = fast.CapturedStep(step, step.params, step.opt, step.generators, strict=True,
                                     backend=GraphStandIn())
    g = torch.Generator().manual_seed(5)
    for _ in range(4):
        x = (torch.rand(n_models, 20, 784, generator=g) < 0.13).float().to(dev)
        torch.testing.assert_close(captured(x), ref(x), rtol=1e-4, atol=1e-3)
    assert captured.captured and not captured.eager
    for p, q in zip(step.params, ref.params):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    for a, b in zip(step.generators, ref.generators):
        assert torch.equal(a.get_state(), b.get_state())
    if device == "cuda":
        assert L._compiled.get("cuda") and L._checked.get("cuda:0") and L._checked.get("cuda:1")


@needs_cuda
def test_cuda_trainer_fast_and_eager_agree(vaexp_main, tiny_args, tmp_path):
    import json

    dirs = {}
    for setting in ("true", "false"):
        d = tmp_path / setting
        assert vaexp_main("train", *tiny_args, "device=cuda", f"fast={setting}", f"hydra.run.dir={d}").code == 0
        dirs[setting] = json.loads((d / "metrics.json").read_text())
    assert abs(dirs["true"]["test"]["nll"] - dirs["false"]["test"]["nll"]) < 1e-3


@needs_cuda
def test_cuda_evaluation_passes_from_free_memory_do_not_change_the_estimates():
    torch.manual_seed(0)
    model = VAE([5], [16], x_dim=30).cuda().eval()
    x = (torch.rand(40, 30, device="cuda") < 0.3).float()
    ref = ev.log_likelihoods(model, x, 500, [1, 64], 2000, seed=0)
    out = ev.log_likelihoods(model, x, 500, [1, 64], 2000, seed=0,
                             pass_rows=ev.pass_rows_for(model, torch.device("cuda"), 500))
    for key in ref:
        assert torch.allclose(out[key], ref[key], rtol=0, atol=1e-4)


# -- the compiled CPU step (vaexp.training.step.CompiledLoneStep) behind CheckedStep ------------------

def _lone(estimator="reparam", k=5, seed=0):
    from vaexp.training.step import make_step

    torch.manual_seed(seed)
    model = VAE([4, 3], [8, 6], x_dim=20, train_mean=torch.linspace(0.1, 0.9, 20))
    gen = torch.Generator().manual_seed(11)
    return model, make_step([model], [StepSpec("iwae", estimator, 1, k)], [gen], [None], SCHEDULE, torch.device("cpu"))


def test_checked_step_keeps_a_candidate_that_matches_and_leaves_the_run_as_the_eager_step():
    ref_model, ref = _lone()
    model, step = _lone()
    checked = fast.CheckedStep(step, step, step.params, step.opt, step.generators, "test step")
    for x in batches(3):
        torch.testing.assert_close(checked(x[None]), ref(x[None]), rtol=0, atol=0)
    assert checked.checked and checked.captured
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(step.generators[0].get_state(), ref.generators[0].get_state())


def test_checked_step_drops_a_candidate_that_differs_or_fails():
    ref_model, ref = _lone()
    model, step = _lone()

    def wrong(x):
        out = step(x)
        with torch.no_grad():
            for p in step.params:
                p.grad.mul_(1.01)  # 1% off: far beyond rounding
        return out

    checked = fast.CheckedStep(wrong, step, step.params, step.opt, step.generators, "test step")
    with pytest.warns(RuntimeWarning, match="test step failed.*differs"):
        first = checked(batches(1)[0][None])
    torch.testing.assert_close(first, ref(batches(1)[0][None]), rtol=0, atol=0)  # the eager step, once
    assert checked.eager and not checked.checked
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)

    def broken(x):
        raise RuntimeError("no C++ compiler")

    _, step2 = _lone()
    strict = fast.CheckedStep(broken, step2, step2.params, step2.opt, step2.generators, "test step", strict=True)
    with pytest.raises(fast.CaptureError, match="no C\\+\\+ compiler"):
        strict(batches(1)[0][None])


def test_checked_step_falls_back_when_a_later_compilation_fails():
    """A checked candidate whose later call fails to compile (a recompilation for another thread
    count or batch size; Dynamo raises before the graph runs, so nothing was updated): a warning
    and the eager step from then on, the run where the eager step leaves it; other errors propagate."""
    ref_model, ref = _lone()
    model, step = _lone()
    flaky = _failing_at(step, 2)
    checked = fast.CheckedStep(flaky, step, step.params, step.opt, step.generators, "test step")
    xs = batches(3)
    torch.testing.assert_close(checked(xs[0][None]), ref(xs[0][None]), rtol=0, atol=0)
    assert checked.checked
    with pytest.warns(RuntimeWarning, match="test step failed.*recompiling failed"):
        torch.testing.assert_close(checked(xs[1][None]), ref(xs[1][None]), rtol=0, atol=0)
    assert checked.eager and not checked.checked
    torch.testing.assert_close(checked(xs[2][None]), ref(xs[2][None]), rtol=0, atol=0)
    assert len(flaky.calls) == 2  # the candidate is not called again
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)

    def other(x):
        raise ValueError("not a compilation")

    _, step2 = _lone()
    checked = fast.CheckedStep(step2, step2, step2.params, step2.opt, step2.generators, "test step")
    checked(xs[0][None])
    checked.candidate = other
    with pytest.raises(ValueError, match="not a compilation"):
        checked(xs[1][None])


def test_checked_step_out_of_memory_in_the_eager_step_is_not_a_failed_candidate():
    """Out of memory in the eager reference step (of the compiled step's check or the CUDA graph's
    capture): no fallback (the eager step is the fallback) and no warning, the allocation failure
    itself; out of memory in the candidate alone: the eager step."""
    import warnings

    _, step = _lone()

    def eager_oom(x):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 99 bytes")

    checked = fast.CheckedStep(step, eager_oom, step.params, step.opt, step.generators, "test step")
    model, opt, gen, _ = setup()
    captured = fast.CapturedStep(eager_oom, list(model.parameters()), opt, [gen], backend=GraphStandIn())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="can't allocate memory"):
            checked(batches(1)[0][None])
        with pytest.raises(RuntimeError, match="can't allocate memory"):
            captured(batches(1)[0])
    ref_model, ref = _lone()
    model, step = _lone()
    checked = fast.CheckedStep(eager_oom, step, step.params, step.opt, step.generators, "test step")
    with pytest.warns(RuntimeWarning, match="test step failed.*allocate"):
        first = checked(batches(1)[0][None])
    torch.testing.assert_close(first, ref(batches(1)[0][None]), rtol=0, atol=0)
    assert checked.eager


def test_fast_step_on_a_cpu_compiles_only_long_runs_of_burdas_models(monkeypatch):
    from vaexp.models.gaussian import LinearGaussianVAE
    from vaexp.training.step import LoneStep, adam

    cpu = torch.device("cpu")
    _, lone = _lone()
    assert fast.fast_step("false", cpu, lone) is None
    assert fast.fast_step("auto", cpu, lone, rows=fast.COMPILE_MIN_ROWS - 1) is None   # too short to repay
    gauss = LinearGaussianVAE(dim=3, layers=1)
    analytic = LoneStep(gauss, StepSpec("iwae", "dreg", 1, 5), adam(gauss.parameters(), SCHEDULE, cpu),
                        torch.Generator().manual_seed(0))
    assert fast.fast_step("auto", cpu, analytic) is None                                # microsecond steps
    monkeypatch.setenv("VAEXP_COMPILE", "0")
    assert fast.fast_step("auto", cpu, lone) is None
    with pytest.raises(fast.CaptureError, match="needs a CUDA device"):
        fast.fast_step("true", cpu, lone)


@pytest.mark.parametrize("objective,estimator,m,gemm", [
    ("iwae", "reparam", 1, "aten"), ("iwae", "dreg", 1, "aten"), ("iwae", "stl", 1, "aten"),
    ("piwae", "reparam", 2, "aten"), ("miwae", "rws", 2, "aten"), ("iwae", "vimco", 1, "aten"),
    # every layer on oneDNN's op, as on AMD CPUs with AVX-512 (where the op's gradients once came out zero)
    ("iwae", "reparam", 1, "onednn"), ("iwae", "dreg", 1, "onednn")])
def test_the_compiled_step_computes_what_the_eager_step_does(objective, estimator, m, gemm):
    """One surrogate, or two as L_θ(θ, stop(z)) + L_φ(stop(θ), φ) in one backward pass: the same
    bounds, gradient norms and parameters as the eager step (which runs two passes)."""
    if gemm == "onednn" and not dense.onednn_works():
        pytest.skip("this torch build has no oneDNN")
    with dense.backend(gemm):
        _compiled_step_against_eager(objective, estimator, m)


def _compiled_step_against_eager(objective, estimator, m):
    from vaexp.training.step import CompiledLoneStep, make_step

    def lone():
        torch.manual_seed(0)
        model = VAE([4, 3], [8, 6], x_dim=20, train_mean=torch.linspace(0.1, 0.9, 20))
        gen = torch.Generator().manual_seed(11)
        return model, make_step([model], [StepSpec(objective, estimator, m, 7)], [gen], [None], SCHEDULE,
                                torch.device("cpu"))

    ref_model, ref = lone()
    model, lone = lone()
    step = fast.fast_step("auto", torch.device("cpu"), lone)
    assert isinstance(step, fast.CheckedStep) and isinstance(step.candidate, CompiledLoneStep)
    for x in batches(4):
        out, want = step(x[None]), ref(x[None])
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)  # bounds and gradient norms
    assert step.checked, step.reason
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=5e-4)  # 4 Adam steps of lr 1e-2, rounding apart
    assert torch.equal(lone.generators[0].get_state(), ref.generators[0].get_state())  # the same ε drawn


def test_the_compiled_step_updates_as_torch_adam_does_from_its_own_gradients():
    """The compiled step's Adam (written into its graph) against torch's fused Adam.step given the
    gradients the step computed (left in p.grad): the same parameters and state up to float
    rounding, the step counts exactly, over steps with a changed learning rate and after the
    state tensors were replaced (a loaded state_dict: the graph must write into the new ones)."""
    from vaexp.training.step import CompiledLoneStep

    _, lone = _lone(k=3)
    step = fast.fast_step("auto", torch.device("cpu"), lone)
    assert isinstance(step.candidate, CompiledLoneStep)
    shadow = [p.detach().clone().requires_grad_(True) for p in lone.params]
    ref = adam(shadow, SCHEDULE, torch.device("cpu"))
    for i, x in enumerate(batches(6)):
        if i == 2:
            fast.set_lr(lone.opt, 3e-3)
            fast.set_lr(ref, 3e-3)
        if i == 4:
            lone.opt.load_state_dict(copy.deepcopy(lone.opt.state_dict()))
        before = [p.detach().clone() for p in lone.params]
        step(x[None])
        assert step.checked, step.reason
        with torch.no_grad():
            for q, b in zip(shadow, before):
                q.copy_(b)
        for q, p in zip(shadow, lone.params):
            q.grad = p.grad.clone()
        ref.step()
        for p, q in zip(lone.params, shadow):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
            ours, theirs = lone.opt.state[p], ref.state[q]
            assert torch.equal(ours["step"], theirs["step"]), i
            for key in ("exp_avg", "exp_avg_sq"):
                # fma or not: ulps of the tensor's scale (a near-cancelling lerp entry has few digits of its own)
                torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6 * float(theirs[key].abs().max()))
        with torch.no_grad():  # the next step starts from the same state on both sides
            for p, q in zip(lone.params, shadow):
                for key in ("exp_avg", "exp_avg_sq"):
                    ref.state[q][key].copy_(lone.opt.state[p][key])


def test_compiled_steps_of_two_runs_in_one_process_each_run_their_own_graph():
    """The compiled step checks only its inputs' tensor properties per call; each step compiles its
    own copy of the code, so a run of the same shapes with another objective compiled later (a
    sweep, the benchmark) cannot hand its graph to the first: both keep matching their eager steps."""
    from vaexp.training.step import CompiledLoneStep

    def run(objective):
        torch.manual_seed(0)
        model = VAE([4, 3], [8, 6], x_dim=20, train_mean=torch.linspace(0.1, 0.9, 20))
        return make_step([model], [StepSpec(objective, "reparam", 1, 5)], [torch.Generator().manual_seed(11)],
                         [None], SCHEDULE, torch.device("cpu"))

    ref_iwae, ref_vae = run("iwae"), run("vae")
    lone_iwae, lone_vae = run("iwae"), run("vae")
    iwae = fast.fast_step("auto", torch.device("cpu"), lone_iwae)
    xs = batches(3)
    torch.testing.assert_close(iwae(xs[0][None]), ref_iwae(xs[0][None]), rtol=1e-4, atol=1e-5)
    vae = fast.fast_step("auto", torch.device("cpu"), lone_vae)
    torch.testing.assert_close(vae(xs[0][None]), ref_vae(xs[0][None]), rtol=1e-4, atol=1e-5)
    for x in xs[1:]:
        torch.testing.assert_close(iwae(x[None]), ref_iwae(x[None]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(vae(x[None]), ref_vae(x[None]), rtol=1e-4, atol=1e-5)
    assert iwae.checked and vae.checked
    assert isinstance(iwae.candidate, CompiledLoneStep) and iwae.candidate.forward is not vae.candidate.forward


def test_the_compiled_step_under_a_dispatch_mode_runs_its_function_eagerly():
    """Dynamo traces nothing under a TorchDispatchMode (here torch's FlopCounterMode; the benchmark
    records GEMMs with one): the step then runs its uncompiled function, the same step, rather than
    failing for want of a graph (it compiles with fullgraph=True), and compiles again after."""
    from torch.utils.flop_counter import FlopCounterMode

    ref_model, ref = _lone()
    model, lone = _lone()
    step = fast.fast_step("auto", torch.device("cpu"), lone)
    xs = batches(3)
    torch.testing.assert_close(step(xs[0][None]), ref(xs[0][None]), rtol=1e-4, atol=1e-5)
    assert step.checked, step.reason
    with FlopCounterMode(display=False) as flops:
        torch.testing.assert_close(step(xs[1][None]), ref(xs[1][None]), rtol=1e-4, atol=1e-5)
    assert flops.get_total_flops() > 0  # the mode saw the step's matmuls
    torch.testing.assert_close(step(xs[2][None]), ref(xs[2][None]), rtol=1e-4, atol=1e-5)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=5e-4)


def test_the_compiled_step_needs_vaexps_plain_adam():
    """An optimizer whose update the graph does not write (weight decay, amsgrad, foreach, hooks):
    no compiled step, the eager one."""
    _, lone = _lone()
    for other in (torch.optim.Adam(lone.params, fused=True, amsgrad=True),
                  torch.optim.Adam(lone.params, fused=True, weight_decay=1e-4), torch.optim.Adam(lone.params)):
        lone.opt = other
        assert lone.compiled() is None
    lone.opt = adam(lone.params, SCHEDULE, torch.device("cpu"))
    assert lone.compiled() is not None
    lone.opt.register_step_post_hook(lambda *a: None)
    assert lone.compiled() is None
