"""scripts/bench.py runs end to end at tiny sizes and prints its three tables (no timing checks:
speed is measured by the script, never asserted in tests)."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("vaexp_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("VAEXP_DATA_DIR", str(tmp_path / "data"))  # never the user's cache
    bench = load_bench()
    out = tmp_path / "bench.md"
    text = bench.main(["--small", "--tiny-models", "--data", "synthetic", "--device", "cpu", "--steps", "2",
                       "--warmup", "1", "--n-test", "2", "--eval-k", "20", "--models", "2", "--repeat", "2",
                       "--stacks", "seeds-k5,mk64", "--markdown", str(out)])
    assert out.read_text().strip() == text.strip()
    assert text.startswith("Device: CPU") and "2 repeat(s)" in text
    for config in ("burda1 iwae k=1 reparam", "burda1 iwae k=5 reparam", "burda1 iwae k=50 reparam",
                   "burda2 iwae k=50 reparam", "burda1 iwae k=50 dreg"):
        assert f"| {config} |" in text
    assert "| K=20, 2 images |" in text and "TF32: n/a on a CPU" in text
    assert "2 × seeds, burda1 iwae k=5" in text and "2 × M·K=64 line" in text
    ratios = re.findall(r"([0-9.]+) \(([0-9.]+)–([0-9.]+)\)×", text)  # median (min–max) of 2 repeats
    assert len(ratios) == 5 + 1 + 2
    for med, low, high in ratios:
        assert 0 < float(low) <= float(med) <= float(high)
    assert "n/a (CPU)" in text and "Peak RSS" in text
    # Both NLL columns estimate the same quantity for the same weights and images.
    nll = re.search(r"\| K=20, 2 images \|[^|]*\|[^|]*\|[^|]*\| ([0-9.]+) \| ([0-9.]+) \|", text)
    assert nll and abs(float(nll.group(1)) - float(nll.group(2))) < 0.05 * float(nll.group(1))
