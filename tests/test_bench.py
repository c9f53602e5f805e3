"""scripts/bench.py runs end to end at tiny sizes and prints its tables; its GEMM roofline counts
FLOPs and shapes right (no timing checks: speed is measured by the script, never asserted in tests)."""
from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench.py"
GPU_CHECK = ROOT / "scripts" / "gpu_check.sh"


def load_bench():
    spec = importlib.util.spec_from_file_location("vaexp_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("VAEXP_DATA_DIR", str(tmp_path / "data"))  # never the user's cache
    monkeypatch.setenv("VAEXP_THREADS", "1")
    monkeypatch.setenv("VAEXP_COMPILE", "0")  # no compilation here (tests/test_capture.py, test_likelihood.py)
    bench = load_bench()
    out = tmp_path / "bench.md"
    text = bench.main(["--small", "--tiny-models", "--data", "synthetic", "--device", "cpu", "--steps", "2",
                       "--warmup", "1", "--rounds", "2", "--n-test", "2", "--eval-k", "20", "--models", "2",
                       "--child-steps", "3", "--child-seconds", "0.2", "--jobs", "2", "--child-rounds", "1",
                       "--shared-k", "5",
                       "--sections", "train,eval,stack,flush,shared,jobs", "--markdown", str(out)])
    assert out.read_text().strip() == text.strip()
    assert text.startswith("Device: CPU") and "2 interleaved round(s)" in text
    for config in ("burda1 iwae k=1 reparam", "burda1 iwae k=5 reparam", "burda1 iwae k=50 reparam",
                   "burda2 iwae k=50 reparam", "burda1 iwae k=50 dreg"):
        assert re.search(rf"\| {re.escape(config)}( \(compiled\))? \|", text)
    assert "| burda1 K=20, 2 images |" in text and "2 × burda1 iwae k=5 reparam" in text
    # every roofline row: rates, GFLOP/s and fractions of the GEMM-bound time that are positive
    rows = re.findall(r"\| [^|]+ \| ([0-9.]+) \| ([0-9]+) \| ([0-9]+)% \| ([0-9.]+) \| ([0-9]+) \| ([0-9]+)% \| "
                      r"([0-9.]+)× \| ([0-9]+) \|", text)
    assert len(rows) == 5 + 1
    for today, _, frac_t, new, _, frac_n, ratio, _ in rows:
        assert float(today) > 0 and float(new) > 0 and int(frac_t) > 0 and int(frac_n) > 0 and float(ratio) > 0
    # the fused and the plain likelihood give the same NLL (the same ε)
    nll = re.search(r"NLL today ([0-9.]+), new ([0-9.]+)", text)
    assert nll and abs(float(nll.group(1)) - float(nll.group(2))) < 1e-3
    assert "subnormals kept (today)" in text and "flushed (vaexp)" in text
    assert "torch defaults (today)" in text and "vaexp.runtime.setup" in text
    assert re.search(r"\| 2 jobs of burda1 iwae k=5 \| [0-9.]+ \| [0-9.]+ \| [0-9.]+× \|", text)
    # it changes no setting of the library it runs in (its eval rows lower the compiled pass's size only inside)
    from vaexp import evaluate

    assert evaluate.COMPILE_MIN_ROWS == 1 << 24


def test_the_roofline_counts_each_gemm_of_a_step():
    bench = load_bench()
    a, b, bias = torch.randn(6, 4), torch.randn(4, 3), torch.randn(3)
    calls = bench.record(lambda: (torch.addmm(bias, a, b), a.t() @ torch.randn(6, 5), torch.bmm(torch.randn(2, 6, 4), torch.randn(2, 4, 3))))
    assert [c[0] for c in calls] == ["aten.addmm.default", "aten.mm.default", "aten.bmm.default"]
    roof = bench.Roofline(calls + calls[:1], torch.device("cpu"))
    assert roof.flops == 2 * (2 * 6 * 4 * 3) + 2 * 4 * 6 * 5 + 2 * 2 * 6 * 4 * 3
    # a transposed operand is timed with its own layout
    mm = [c for c in calls if c[0] == "aten.mm.default"][0]
    assert mm[1][0] == ((4, 6), (1, 4)) and roof.inputs[mm][0].stride() == (1, 4)
    assert roof.seconds(reps=1) > 0


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
def test_the_rooflines_onednn_forms_compute_the_recorded_products():
    """The limit is the faster kernel of the *same* product: each recorded GEMM (with vaexp's
    layouts: transposed weights, a row bias, a stack's [N, 1, out] bias) by oneDNN equals ATen's."""
    bench = load_bench()
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(30, 20, generator=gen), torch.randn(20, 10, generator=gen)
    bias = torch.randn(10, generator=gen)
    a3, b3 = torch.randn(3, 30, 20, generator=gen), torch.randn(3, 20, 10, generator=gen)
    bias3 = torch.randn(3, 1, 10, generator=gen)
    cases = [("aten.mm.default", [a, b]), ("aten.mm.default", [a, b.t().contiguous().t()]),
             ("aten.addmm.default", [bias, a, b]), ("aten.bmm.default", [a3, b3]),
             ("aten.baddbmm.default", [bias3, a3, b3]),
             ("aten.baddbmm.default", [torch.randn(3, 30, 10, generator=gen), a3, b3])]
    for name, args in cases:
        want = getattr(torch.ops.aten, name.split(".")[1])(*args)
        got = bench._onednn_form(name, args)()
        got = torch.stack(got) if isinstance(got, list) else got
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_unknown_sections_are_refused_with_the_choices(capsys):
    bench = load_bench()
    with pytest.raises(SystemExit) as exit_:
        bench.parse(["--sections", "train,evaluation"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "no section evaluation" in err and "typical" in err


def test_train_rows_are_chosen_by_name_and_unknown_ones_refused(capsys):
    bench = load_bench()
    assert bench.parse([]).train == bench.TRAIN_CONFIGS
    assert bench.parse(["--train", "burda1:5:reparam, burda1:50:dreg"]).train == [("burda1", 5, "reparam"),
                                                                               ("burda1", 50, "dreg")]
    for bad in ("burda1:7:reparam", ","):
        with pytest.raises(SystemExit) as exit_:
            bench.parse(["--train", bad])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "--train: no row" in err and "burda2:50:reparam" in err


def test_the_gpu_check_script_names_what_exists():
    """scripts/gpu_check.sh (the GPU verification, run where no test of it can) is valid bash, and
    the test files, bench sections and commands it runs exist; without a verb it prints its usage."""
    text = GPU_CHECK.read_text()
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)]).returncode == 0
    files = re.findall(r"tests/(test_\w+\.py)", text)
    assert "test_capture.py" in files and "test_likelihood.py" in files
    assert all((ROOT / "tests" / f).is_file() for f in files)
    sections = re.search(r"--sections (\S+)", text).group(1)
    assert load_bench().parse(["--sections", sections]).sections == ["train", "eval", "typical"]
    for command in ("vaexp train", "vaexp eval"):
        assert f"-m {command}" in text
    usage = subprocess.run(["bash", str(GPU_CHECK)], capture_output=True, text=True)
    assert usage.returncode == 2 and "prepare | run" in usage.stderr
