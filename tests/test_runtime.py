"""vaexp.runtime: subnormals flushed on every thread, the thread count from the cores actually free
(the governor's arithmetic on hand-made /proc samples), a parallel job's share, and the invariant
the governor relies on: a training step and the evaluation are bit-identical with 1 and 2 threads.
Speed itself is measured by scripts/bench.py (sections flush, shared, jobs), never here."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vaexp import runtime

ROOT = Path(__file__).resolve().parents[1]

STAT = """cpu  100 0 50 1000 10 0 0 5 0 0
cpu0 60 0 20 400 5 0 0 5 0 0
cpu1 40 0 30 600 5 0 0 0 0 0
intr 12345
"""


def test_cpu_ticks_count_busy_time_including_steal():
    assert runtime.cpu_ticks(STAT, [0]) == 60 + 20 + 5   # user + system + steal; idle and iowait excluded
    assert runtime.cpu_ticks(STAT, [0, 1]) == 85 + 70
    assert runtime.cpu_ticks(STAT, [7]) == 0


def test_own_ticks_read_utime_and_stime_of_every_thread():
    stat = "4242 (python (x) y) R 1 2 3 4 5 6 7 8 9 10 111 222 0 0 20 0 3 0"
    assert runtime.own_ticks(stat) == 333


@pytest.mark.parametrize("others,cores,limit,expected", [
    (0.0, 2, 2, 2), (0.2, 2, 2, 2), (0.35, 2, 2, 1), (1.0, 2, 2, 1), (2.0, 2, 2, 1),
    (0.0, 16, 4, 4), (6.0, 16, 16, 10), (6.4, 16, 16, 9), (0.0, 2, 1, 1), (0.25, 2, 2, 2)])
def test_threads_for_the_cores_left_free(others, cores, limit, expected):
    assert runtime.threads_for(others, cores, limit) == expected


def test_the_governor_drops_at_once_and_rises_after_two_calm_samples():
    g = runtime.Governor(2)
    g.n_cores, g.wanted = 2, 2
    assert g.update(1.0) == 1          # another process got busy: one thread at once
    assert g.update(0.0) == 1          # one calm sample is not enough
    assert g.update(0.0) == 2          # two are
    assert g.update(0.0) == 2
    assert [g.update(v) for v in (0.0, 0.9, 0.0, 0.9)] == [2, 1, 1, 1]  # flapping load keeps 1


def test_adapt_threads_applies_the_governors_count_in_the_calling_thread(monkeypatch):
    old = torch.get_num_threads()
    g = SimpleNamespace(wanted=1)
    monkeypatch.setattr(runtime, "_governor", g)
    monkeypatch.setattr(runtime, "_applied", None)
    try:
        runtime.adapt_threads()
        assert torch.get_num_threads() == 1
        g.wanted = 2
        runtime.adapt_threads()
        assert torch.get_num_threads() == 2 and runtime._applied == 2
    finally:
        torch.set_num_threads(old)


def test_on_cuda_the_thread_count_is_held(monkeypatch):
    """torch.compile guards on the thread count: on CUDA (where the host's threads hardly matter)
    the governor stops, so no change recompiles the kernels, least of all inside a capture."""
    old = torch.get_num_threads()
    stopped = []
    g = SimpleNamespace(wanted=1, stop=lambda: stopped.append(True))
    monkeypatch.setattr(runtime, "_governor", g)
    monkeypatch.setattr(runtime, "_applied", old)
    try:
        runtime.hold_threads_for(torch.device("cpu"))        # a CPU run keeps its governor
        assert runtime._governor is g and not stopped
        runtime.hold_threads_for(torch.device("cuda"))
        assert runtime._governor is None and stopped == [True]
        runtime.adapt_threads()
        assert torch.get_num_threads() == old
    finally:
        torch.set_num_threads(old)


def test_compiled_functions_have_room_for_every_governed_thread_count(monkeypatch):
    """Dynamo keeps 8 entries per function by default, and each thread count is one (Inductor's
    CPU kernels bake it in): a 16-core machine's governor may choose 16 counts."""
    import torch._dynamo

    config = torch._dynamo.config  # set and restored by hand: monkeypatch may delattr a config option
    old = config.recompile_limit
    try:
        config.recompile_limit = 8
        monkeypatch.setattr(runtime, "_governor", SimpleNamespace(limit=16))
        fn = runtime.compile(lambda x: x + 1, dynamic=False)
        assert callable(fn) and config.recompile_limit >= 16 + 8
        monkeypatch.setattr(runtime, "_governor", None)
        config.recompile_limit = 8
        runtime.compile(lambda x: x + 1)
        assert config.recompile_limit == 1 + 8  # fixed threads: one count
    finally:
        config.recompile_limit = old


def test_each_parallel_cuda_job_gets_its_gpu_and_cpu_jobs_none(monkeypatch):
    """Per job, not per process (joblib's workers run job after job); CPU jobs never touch CUDA."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: chosen[-1])
    assert [runtime.assign_gpu(8, n, "cuda") for n in (0, 5, 6)] == [0, 1, 2]
    assert runtime.assign_gpu(8, 3, "auto") == 3
    assert runtime.assign_gpu(8, 3, "cpu") is None and runtime.assign_gpu(1, 3, "cuda") is None
    assert chosen == [0, 1, 2, 3]


def test_a_parallel_jobs_share_of_the_cores():
    assert runtime.job_threads(1, 2) == 2
    assert runtime.job_threads(4, 2) == 1
    assert runtime.job_threads(2, 16) == 8
    assert runtime.job_threads(3, 16) == 5


def test_parallel_jobs_outside_hydra_is_one_job():
    from vaexp.cli import parallel_jobs

    assert parallel_jobs() == (1, None)


def _fresh(code: str, **env) -> dict:
    """Run `code` in a fresh interpreter (set-up acts once per process, before torch's first parallel op)."""
    import os

    ours = ("OMP_NUM_THREADS", runtime.THREADS_ENV, runtime.FLUSH_ENV, runtime.MKL_CBWR_ENV)
    full = {k: v for k, v in os.environ.items() if k not in ours}
    full.update(env)
    # A hang guard, not a speed test: the compiled steps with an empty compiler cache took over 120 s
    # on 2 cores shared with other work.
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


SETUP = ("import json, torch; from vaexp import runtime; info = runtime.setup(threads={threads}); "
         "print(json.dumps({{'info': {{k: str(v) for k, v in info.items()}}, 'flushed': runtime.denormals_flushed(), "
         "'threads': torch.get_num_threads()}}))")


def test_setup_flushes_subnormals_on_every_thread():
    res = _fresh(SETUP.format(threads=2))
    assert res["threads"] == 2 and res["info"]["flush_denormal"] == "True"
    assert res["flushed"]  # 1e-20 * 1e-20 is 0 on both threads' halves of the op
    kept = _fresh(SETUP.format(threads=2), VAEXP_FLUSH_DENORMAL="0")
    assert not kept["flushed"] and kept["info"]["flush_denormal"] == "False"


def test_setup_takes_the_thread_count_from_the_settings():
    assert _fresh(SETUP.format(threads=None), VAEXP_THREADS="1")["threads"] == 1
    assert _fresh(SETUP.format(threads=None), OMP_NUM_THREADS="1")["threads"] == 1
    governed = _fresh(SETUP.format(threads=None))
    assert "governed" in governed["info"]["threads"] and 1 <= governed["threads"] <= runtime.cores()


BROAD_GEMMS = """
import json, os, torch
{first}
from vaexp import runtime
differs = []  # Burda's layer shapes, forward, dx and dW products, at 1 and 2 threads
for rows in (20, 100, 1000, 2560):
    for n_in, n_out in ((784, 200), (200, 200), (200, 100), (50, 200), (200, 784), (100, 50)):
        g = torch.Generator().manual_seed(rows + n_in + n_out)
        a, w, d = (torch.randn(rows, n_in, generator=g), torch.randn(n_out, n_in, generator=g),
                   torch.randn(rows, n_out, generator=g))
        out = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out.append((a @ w.t(), d @ w, d.t() @ a))
        differs += [not torch.equal(x, y) for x, y in zip(*out)]
print(json.dumps({{"mode": os.environ.get("MKL_CBWR"), "probe": runtime.gemm_thread_invariant(),
                  "all_equal": not any(differs)}}))
"""


def test_importing_vaexp_makes_gemms_independent_of_the_thread_count():
    """MKL on an Intel AVX-512 CPU splits GEMM sums between threads unless it runs in its strict
    mode, which it reads at its first GEMM: `import vaexp` asks for it; a mode the user set is kept,
    and the probe setup() relies on sees what a sweep over Burda's shapes sees."""
    if runtime.cores() < 2:
        pytest.skip("needs 2 cores")
    ours = _fresh(BROAD_GEMMS.format(first="import vaexp"))
    assert ours == {"mode": "AUTO,STRICT", "probe": True, "all_equal": True}
    theirs = _fresh(BROAD_GEMMS.format(first="import vaexp"), MKL_CBWR="AUTO")
    assert theirs["mode"] == "AUTO" and theirs["probe"] == theirs["all_equal"]  # False on an AVX-512 Xeon
    late = _fresh(BROAD_GEMMS.format(first="torch.ones(8, 8) @ torch.ones(8, 8); import vaexp"), MKL_CBWR="AUTO")
    assert late["probe"] == late["all_equal"]


def test_setup_keeps_the_thread_count_fixed_where_gemms_depend_on_it():
    code = ("import json, warnings, torch; from vaexp import runtime; runtime._gemm_invariant = False; "
            "warnings.simplefilter('error', RuntimeWarning)\n"
            "try:\n    runtime.setup()\n    said = ''\nexcept RuntimeWarning as w:\n    said = str(w)\n"
            "warnings.simplefilter('ignore'); runtime._setup_done.clear(); info = runtime.setup()\n"
            "print(json.dumps({'said': said, 'threads': str(info['threads']), 'governor': runtime._governor is None}))")
    res = _fresh(code)
    assert "other bits at 1 and 2 threads" in res["said"] and "MKL_CBWR=AUTO,STRICT" in res["said"]
    assert res["threads"].isdigit() and res["governor"]  # a fixed count, no governor thread


INVARIANCE = """
import json, torch
from types import SimpleNamespace
from vaexp import evaluate as ev, runtime
from vaexp.models import dense, likelihood
from vaexp.models.burda import VAE
from vaexp.training import capture
from vaexp.training.step import StepSpec, make_step
runtime.setup(threads=2)
dense._vendor_wants_onednn = {onednn}  # backend auto's rule as on a non-Intel AVX-512 CPU, or elsewhere
mean = torch.rand(784, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
x = (torch.rand(60, 784, generator=torch.Generator().manual_seed(1)) < mean).float()
sch = SimpleNamespace(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-4)
out = []
for threads in (1, 2):
    torch.set_num_threads(threads)
    params, metrics = [], []
    for estimator in ("dreg", "reparam"):  # the eager step, and the compiled one (behind its check)
        torch.manual_seed(0)
        model = VAE([50], [200], train_mean=mean)
        step = make_step([model], [StepSpec("iwae", estimator, 1, 50)], [torch.Generator().manual_seed(0)], [None],
                         sch, torch.device("cpu"))
        step = capture.fast_step("auto", torch.device("cpu"), step) or step
        metrics += [step(x[None, i * 20:(i + 1) * 20]) for i in range(3)]
        params += [p.detach().clone() for p in model.parameters()]
    ll = [ev.log_likelihoods(model.eval(), x[:2], 500, [1], ev.DEFAULT_ROWS, 0, pass_rows=256)["log_px"]]
    ev.COMPILE_MIN_ROWS = 0  # the compiled evaluation pass, as a whole test set runs it
    ll.append(ev.log_likelihoods(model, x[:2], 500, [1], ev.DEFAULT_ROWS, 0, pass_rows=256)["log_px"])
    ev.COMPILE_MIN_ROWS = 1 << 24
    out.append((params, torch.cat(metrics), torch.stack(ll)))
(p1, m1, l1), (p2, m2, l2) = out
print(json.dumps({"params": all(torch.equal(a, b) for a, b in zip(p1, p2)), "metrics": torch.equal(m1, m2),
                  "ll": torch.equal(l1, l2),
                  # the compiled pass ran wherever a compiler works
                  "compiled_pass": (ev._compiled_pass.get("fn") not in (None, False))
                  == (likelihood._kernels(torch.device("cpu")) is not None)}))
"""


@pytest.mark.parametrize("onednn", [False, True], ids=["mkl", "onednn"])
def test_steps_and_evaluation_do_not_depend_on_the_thread_count(onednn):
    """The governor changes the thread count during a run: results must not change with it (in a
    fresh process set up as the CLI sets it up: every thread flushes subnormals), with the kernels
    backend auto picks on either kind of CPU (vaexp.models.dense.vendor_wants_onednn)."""
    if runtime.cores() < 2:
        pytest.skip("needs 2 cores")
    from vaexp.models import dense

    if onednn and not dense.onednn_works():
        pytest.skip("this torch build has no oneDNN")
    assert _fresh(INVARIANCE.replace("{onednn}", str(onednn))) == {
        "params": True, "metrics": True, "ll": True, "compiled_pass": True}


def test_setup_after_the_threads_started_keeps_subnormals_everywhere():
    """Flushing on the calling thread only would make results depend on the thread count."""
    code = ("import json, warnings, torch; from vaexp import runtime; torch.set_num_threads(2); "
            "torch.full((1 << 18,), 1.0).mul(2.0); "  # torch's worker thread starts here, keeping subnormals
            "warnings.simplefilter('ignore'); info = runtime.setup(threads=2); "
            "print(json.dumps({'flush': info['flush_denormal'], 'main': bool(torch.tensor(1e-20) * 1e-20 != 0)}))")
    assert _fresh(code) == {"flush": False, "main": True}


@pytest.mark.parametrize("flush", ["1", "0"])
def test_a_cli_run_is_set_up_and_records_whether_it_flushed(cli, tmp_path, tiny_args, flush):
    """`vaexp train` runs vaexp.runtime.setup in its process; metrics.json says whether subnormals
    were flushed (a run that flushes differs from one that does not in the last bits)."""
    run_dir = tmp_path / "run"
    res = cli("train", *tiny_args, f"hydra.run.dir={run_dir}", env_extra={"VAEXP_FLUSH_DENORMAL": flush})
    assert res.code == 0, res.err
    assert json.loads((run_dir / "metrics.json").read_text())["train"]["flush_denormal"] is (flush == "1")


def test_a_resumed_run_on_the_compiled_paths_is_bit_identical(vaexp_main, tmp_path, monkeypatch):
    """With the compiled step and the fused likelihood (thresholds lowered so a tiny run uses them),
    a run interrupted mid-epoch and resumed ends exactly where the uninterrupted run does."""
    from conftest import TINY_BURDA1, TINY_DATA

    from vaexp.models import likelihood
    from vaexp.training import capture

    if likelihood._kernels(torch.device("cpu")) is None:
        pytest.skip("torch.compile does not work on this machine")
    monkeypatch.setattr(capture, "COMPILE_MIN_ROWS", 0)
    monkeypatch.setattr(likelihood, "COMPILE_MIN_ELEMENTS", 0)
    made = []
    fast_step = capture.fast_step
    monkeypatch.setattr(capture, "fast_step", lambda *a, **kw: made.append(fast_step(*a, **kw)) or made[-1])
    args = TINY_DATA + TINY_BURDA1 + ["schedule=quick", "schedule.epochs=2", "eval.k=10", "eval.au_samples=4",
                                      "progress=false", "batch_size=20", "k=5"]
    assert vaexp_main("train", *args, f"hydra.run.dir={tmp_path / 'ref'}").code == 0
    assert made and isinstance(made[-1], capture.CheckedStep) and made[-1].checked
    monkeypatch.setenv("VAEXP_INTERRUPT_AT_STEP", "7")
    assert vaexp_main("train", *args, f"hydra.run.dir={tmp_path / 'run'}").code == 130
    monkeypatch.delenv("VAEXP_INTERRUPT_AT_STEP")
    assert vaexp_main("train", f"resume={tmp_path / 'run'}", "progress=false").code == 0
    assert made[-1].checked
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", map_location="cpu", weights_only=False) for d in ("ref", "run"))
    assert a["state"]["global_step"] == b["state"]["global_step"] == 10
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for idx, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][idx][key])), (idx, key)
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("ref", "run"))
    assert ma["test"] == mb["test"] and ma["train"]["bound"] == mb["train"]["bound"]
