#!/usr/bin/env python
"""vaexp's speed against the machine's own limit: the float32 GEMM rate on each model's own shapes.

    python scripts/bench.py --small                       # CPU-sized (minutes)
    python scripts/bench.py --small --rounds 5 --markdown bench.md
    python scripts/bench.py                               # full sizes (a GPU)

Every row is timed in interleaved rounds (today's path, the new one, then the GEMMs of that
configuration alone) so that drifting load on a shared machine hits all three alike; the tables
show medians over rounds. For each configuration the GEMMs (forward and backward) of one step or
pass are recorded with their exact shapes and layouts and timed in isolation on the fastest kernel
the machine has for each (ATen's, i.e. MKL or cuBLAS, and on a CPU oneDNN's): their sum is the
GEMM-bound time, "% GEMM" = GEMM-bound time / measured time, and GFLOP/s counts those GEMMs' FLOPs
(the model's arithmetic; elementwise work is not counted).

Sections (--sections):
  train  steps/s of one run's training step (the rows --train names, default all), fed as the trainer feeds it (vaexp.training.loop.EpochData,
         vaexp.training.step.make_step): today = the eager step with the plain Bernoulli formula and
         ATen's GEMMs (MKL on a CPU); new = what vaexp runs now (fused likelihood kernels, the dense
         layers on oneDNN where vaexp.models.dense picks it; on a CPU the compiled step behind its
         check, vaexp.training.capture.fast_step; on CUDA the captured CUDA graph);
  eval   images/s of the K=5000 test NLL (vaexp.evaluate.log_likelihoods), today's path vs the new one;
  stack  N runs of one shape stacked vs the same N trained one after another (new step), model-steps/s;
  flush  the k=50 step right after initialisation with subnormals flushed vs kept (fresh processes);
  shared steps/s alone and next to one busy 2-thread process, with torch's default threads (today) and
         with vaexp.runtime.setup (the thread governor), in fresh processes;
  jobs   n jobs at once with cores/n threads each (as hydra/launcher=parallel runs them) vs the same n
         jobs one after another, total steps/s;
  typical the "typical" IWAE loop (DataLoader, torch.distributions, .item() per step) vs vaexp, steps/s.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vaexp import runtime  # noqa: E402  (torch-free: the child processes set up before torch loads)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from vaexp import evaluate as ev  # noqa: E402
from vaexp.data import load_dataset  # noqa: E402
from vaexp.models import dense, likelihood  # noqa: E402
from vaexp.models.burda import VAE  # noqa: E402
from vaexp.training import capture  # noqa: E402
from vaexp.training.loop import EpochData  # noqa: E402
from vaexp.training.step import StepSpec, make_step  # noqa: E402

BATCH = 20
REPLAY_CALLS = 50  # GEMMs per timed CUDA graph in the roofline (see `alone`)
SCHEDULE = SimpleNamespace(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-4)  # Burda et al.'s Adam
MODELS = {"burda1": ([50], [200]), "burda2": ([100, 50], [200, 100])}
TINY_MODELS = {"burda1": ([4], [16]), "burda2": ([6, 4], [16, 8])}
TRAIN_CONFIGS = [("burda1", 1, "reparam"), ("burda1", 5, "reparam"), ("burda1", 50, "reparam"),
                 ("burda2", 50, "reparam"), ("burda1", 50, "dreg")]
BUSY = ("import sys, time, torch\ntorch.set_num_threads(2)\na = torch.randn(512, 512)\nend = time.time() + float(sys.argv[1])\n"
        "while time.time() < end:\n    a = torch.tanh(a @ a)\n")


def config_name(config) -> str:
    """A train row as --train names it: model:k:estimator."""
    return ":".join(map(str, config))


# ============================================================================ devices and timing

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def alone(fn: Callable[[], object], device: torch.device, reps: int = 5) -> float:
    """Seconds of one call of `fn` in isolation. On a CPU the best of `reps` timed calls. On CUDA a
    timed call would measure the launch and the synchronisations, not a microsecond GEMM: the
    best of `reps` replays of a CUDA graph of REPLAY_CALLS calls, between two events, per call
    (back-to-back launches between events where the graph cannot be captured)."""
    if device.type != "cuda":
        return min(timed(fn, device) for _ in range(reps))
    n = REPLAY_CALLS
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(n):
                fn()
        run = graph.replay
    except Exception:  # noqa: BLE001 - not capturable: launches, which may then bound the time
        def run():
            for _ in range(n):
                fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = math.inf
    for _ in range(reps):
        start.record()
        run()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / n)
    return best


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2 ** 30:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {name}, {os.cpu_count()} cores, torch {torch.__version__}"


def load_data(kind: str, device: torch.device, n_train: int):
    """MNIST from the user cache (no download), else small synthetic images."""
    if kind in ("auto", "mnist"):
        cfg = SimpleNamespace(name="mnist", path=None, data_dir=None, n_valid=400, binarize_seed=1234, download=False)
        try:
            return load_dataset(cfg, device), "MNIST (cache)"
        except Exception as err:  # noqa: BLE001
            if kind == "mnist":
                raise
            print(f"bench: MNIST not available ({type(err).__name__}); using synthetic images", file=sys.stderr)
    cfg = SimpleNamespace(name="synthetic", n_train=n_train, n_test=200, seed=0, n_valid=0, binarize_seed=1234)
    return load_dataset(cfg, device), f"synthetic ({n_train} training images)"


# ============================================================================ the GEMM roofline

class GemmRecorder(TorchDispatchMode):
    """Records every mm / addmm / bmm / baddbmm (shapes, strides, dtype) that runs inside it."""

    OPS = {"aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.baddbmm.default"}

    def __init__(self):
        super().__init__()
        self.calls: List[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in self.OPS:
            tensors = [a for a in args if isinstance(a, Tensor)]
            self.calls.append((str(func), tuple((tuple(t.shape), tuple(t.stride())) for t in tensors),
                               tensors[0].dtype, tensors[0].device.type))
        return func(*args, **(kwargs or {}))


def gemm_flops(call) -> int:
    name, specs = call[0], call[1]
    a, b = specs[-2][0], specs[-1][0]
    if name.endswith("bmm.default"):
        return 2 * a[0] * a[1] * a[2] * b[2]
    return 2 * a[0] * a[1] * b[1]


class Roofline:
    """The recorded GEMMs of one step (or pass): their FLOPs, and the time they take in isolation,
    each on the fastest float32 kernel the machine has for it: ATen's (MKL on a CPU, cuBLAS on
    CUDA) and, on a CPU with oneDNN, oneDNN's (a batched product as one oneDNN call per slice).
    `aten_seconds` is ATen's alone (the limit a benchmark that only knows torch.mm would report)."""

    def __init__(self, calls: List[tuple], device: torch.device):
        self.device = device
        self.counts: Dict[tuple, int] = {}
        for c in calls:
            self.counts[c] = self.counts.get(c, 0) + 1
        self.flops = sum(gemm_flops(c) * n for c, n in self.counts.items())
        self.inputs = {c: [_strided(size, stride, c[2], device) for size, stride in c[1]] for c in self.counts}
        self.onednn = device.type == "cpu" and dense.onednn_works()
        self.aten_seconds: List[float] = []

    def seconds(self, reps: int = 5) -> float:
        """GEMM-bound seconds of one step: each shape timed alone on each kernel (best of `reps`),
        the faster kernel's time times its count (ATen's alone appended to aten_seconds)."""
        total = aten_total = 0.0
        for c, n in self.counts.items():
            op = getattr(torch.ops.aten, c[0].split(".")[1])
            args = self.inputs[c]
            kernels = [lambda: op(*args)] + ([_onednn_form(c[0], args)] if self.onednn else [])
            times = []
            for fn in kernels:
                fn()
                times.append(alone(fn, self.device, reps))
            total += min(times) * n
            aten_total += times[0] * n
        self.aten_seconds.append(aten_total)
        return total


def _onednn_form(name: str, args: List[Tensor]) -> Callable[[], object]:
    """The same product by oneDNN: act(a @ b_tᵀ + bias) with b_t = bᵀ (a view), per slice when batched."""
    lin = torch.ops.mkldnn._linear_pointwise
    if name == "aten.mm.default":
        a, b = args
        return lambda: lin(a, b.t(), None, "none", [], "")
    if name == "aten.addmm.default":
        bias, a, b = args[:3]
        vec = bias if bias.dim() == 1 else None  # a broadcast row bias; any other kind is added after
        if vec is not None:
            return lambda: lin(a, b.t(), vec, "none", [], "")
        return lambda: lin(a, b.t(), None, "none", [], "") + bias
    if name == "aten.bmm.default":
        a, b = args
        return lambda: [lin(a[i], b[i].t(), None, "none", [], "") for i in range(a.shape[0])]
    bias, a, b = args[:3]  # baddbmm: bias [N, 1, out] in vaexp's stacks (a row bias per slice)
    if bias.dim() == 3 and bias.shape[1] == 1:
        return lambda: [lin(a[i], b[i].t(), bias[i].reshape(-1), "none", [], "") for i in range(a.shape[0])]
    return lambda: [lin(a[i], b[i].t(), None, "none", [], "") + bias[i] for i in range(a.shape[0])]


def _strided(size, stride, dtype, device) -> Tensor:
    """A tensor with exactly this layout (a transposed or broadcast view of a random buffer)."""
    extent = 1 + sum((s - 1) * st for s, st in zip(size, stride) if s > 0)
    return torch.randn(extent, device=device, dtype=dtype).as_strided(size, stride)


def record(fn: Callable[[], object]) -> List[tuple]:
    rec = GemmRecorder()
    with rec:
        fn()
    return rec.calls


# ============================================================================ training

def vaexp_model(name: str, seed: int, data, device: torch.device, sizes) -> VAE:
    latents, hidden = sizes[name]
    torch.manual_seed(seed)
    return VAE(latents, hidden, x_dim=data.train.shape[1], train_mean=data.train_mean).to(device)


class Trainer:
    """One path's training step on fresh models, fed as the trainer feeds it (EpochData, the
    trainer's make_step and fast_step): call run(n) for n more steps."""

    def __init__(self, models, specs, seeds, data, device, new: bool):
        self.mode = "auto" if new else "plain"
        self.gemm = dense.get_backend() if new else "aten"
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.step = make_step(list(models), list(specs), gens, [None] * len(models), SCHEDULE, device)
        self.fn = (capture.fast_step("auto", device, self.step) if new else None) or self.step
        self.epoch = EpochData(data, [s + 7 for s in seeds], 0, device)
        self.per_epoch = data.train.shape[0] // BATCH
        self.acc = torch.zeros(len(models), 4, device=device, dtype=torch.float64)
        self.i = 0

    def run(self, n: int) -> None:
        with likelihood.mode(self.mode), dense.backend(self.gemm):
            for _ in range(n):
                self.acc.add_(self.fn(self.epoch.batch(self.i % self.per_epoch, BATCH)))
                self.i += 1

    @property
    def fast(self) -> str:
        if not getattr(self.fn, "captured", False):
            return "eager"
        return "CUDA graph" if isinstance(self.fn, capture.CapturedStep) else "compiled"


def rounds(variants: Dict[str, Callable[[], float]], roof: Roofline, n_rounds: int) -> Dict[str, List[float]]:
    """Per round: each variant's seconds, then the GEMM-bound seconds; lists over rounds."""
    out: Dict[str, List[float]] = {name: [] for name in variants}
    out["gemm"] = []
    for _ in range(n_rounds):
        for name, fn in variants.items():
            out[name].append(fn())
        out["gemm"].append(roof.seconds())
    out["gemm_aten"] = list(roof.aten_seconds[-n_rounds:])
    return out


def train_rows(args, data, device, sizes) -> List[Dict]:
    rows = []
    for name, k, estimator in args.train:
        spec = StepSpec("iwae", estimator, 1, k)
        paths = {p: Trainer([vaexp_model(name, 0, data, device, sizes)], [spec], [0], data, device, p == "new")
                 for p in ("today", "new")}
        for t in paths.values():
            t.run(args.warmup)  # warm-up (and the fast step's compilation and check) untimed
        roof = Roofline(record(lambda: paths["today"].run(1)), device)
        per = {p: (lambda t=t: timed(lambda: t.run(args.steps), device) / args.steps) for p, t in paths.items()}
        r = rounds(per, roof, args.rounds)
        rows.append(row_of(f"{name} iwae k={k} {estimator}", r, roof.flops, fast=paths["new"].fast))
        print(f"  train {rows[-1]['label']}: " + summary(rows[-1]), file=sys.stderr, flush=True)
    return rows


def row_of(label: str, r: Dict[str, List[float]], flops: int, unit: float = 1.0, **extra) -> Dict:
    """Rates (unit per second), GFLOP/s and fraction of the GEMM-bound time, median over rounds."""
    row = {"label": label, **extra}
    for path in ("today", "new"):
        secs, gemm = r[path], r.get(f"gemm_{path}", r["gemm"])
        row[path] = {"rate": statistics.median(unit / s for s in secs),
                     "gflops": statistics.median(flops / s / 1e9 for s in secs),
                     "frac": statistics.median(g / s for g, s in zip(gemm, secs)),
                     "spread": (min(unit / s for s in secs), max(unit / s for s in secs))}
    row["gemm_gflops"] = statistics.median(flops / g / 1e9 for g in r["gemm"])
    row["aten_gflops"] = statistics.median(flops / g / 1e9 for g in r["gemm_aten"]) if r.get("gemm_aten") else None
    row["speedup"] = statistics.median(t / n for t, n in zip(r["today"], r["new"]))
    return row


def summary(row: Dict) -> str:
    return (f"today {row['today']['rate']:.1f}/s ({100 * row['today']['frac']:.0f}% GEMM), "
            f"new {row['new']['rate']:.1f}/s ({100 * row['new']['frac']:.0f}% GEMM), {row['speedup']:.2f}x")


# ============================================================================ evaluation

def eval_rows(args, data, device, sizes) -> List[Dict]:
    model = vaexp_model("burda1", 0, data, device, sizes).eval()
    x = data.test[:args.n_test]
    k = args.eval_k
    pass_rows = ev.pass_rows_for(model, device, k)
    report_k = [kk for kk in (1, 64) if kk < k]

    new_gemm = dense.get_backend()

    def nll(mode: str, xs: Tensor) -> float:  # plain: today's path (plain formula, ATen's GEMMs)
        # `vaexp eval` compiles its forward pass for a whole test set (evaluate.COMPILE_MIN_ROWS rows
        # and more); --small times a slice of it, as it runs inside such an evaluation.
        least, ev.COMPILE_MIN_ROWS = ev.COMPILE_MIN_ROWS, 0
        try:
            with likelihood.mode(mode), dense.backend("aten" if mode == "plain" else new_gemm), ev.no_tf32():
                ll = ev.log_likelihoods(model, xs, k, report_k, ev.DEFAULT_ROWS, 0, pass_rows=pass_rows)
        finally:
            ev.COMPILE_MIN_ROWS = least
        return float(-ll["log_px"].mean())

    values = {m: nll(m, x) for m in ("plain", "auto")}  # also the warm-up (and the kernels' compilation)
    # The GEMMs of one image, recorded on today's path (the same products; the new path's first pass
    # also runs its eager check, which is not the model's arithmetic).
    with torch.no_grad(), ev.no_tf32(), likelihood.mode("plain"), dense.backend("aten"):
        calls = record(lambda: ev.log_likelihoods(model, x[:1], k, report_k, ev.DEFAULT_ROWS, 0, pass_rows=pass_rows))
    roof = Roofline(calls, device)
    per = {"today": lambda: timed(lambda: nll("plain", x), device) / x.shape[0],
           "new": lambda: timed(lambda: nll("auto", x), device) / x.shape[0]}
    r = rounds({p: f for p, f in per.items()}, roof, args.rounds)
    row = row_of(f"burda1 K={k}, {x.shape[0]} images", r, roof.flops, nll_today=values["plain"], nll_new=values["auto"])
    print(f"  eval {row['label']}: " + summary(row), file=sys.stderr, flush=True)
    tf32 = None
    if device.type == "cuda":
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            with likelihood.mode("auto"):
                tf32 = float(-ev.log_likelihoods(model, x, k, report_k, ev.DEFAULT_ROWS, 0,
                                                  pass_rows=pass_rows)["log_px"].mean()) - values["auto"]
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
    row["tf32"] = tf32
    return [row]


# ============================================================================ stacked vs sequential

def stack_rows(args, data, device, sizes) -> List[Dict]:
    n = args.models
    spec = StepSpec("iwae", "reparam", 1, 5)
    stacked = Trainer([vaexp_model("burda1", i, data, device, sizes) for i in range(n)], [spec] * n, list(range(n)),
                      data, device, True)
    lone = [Trainer([vaexp_model("burda1", i, data, device, sizes)], [spec], [i], data, device, True) for i in range(n)]
    stacked.run(args.warmup)
    for t in lone:
        t.run(args.warmup)
    roof = Roofline(record(lambda: stacked.run(1)), device)
    roof_lone = Roofline(record(lambda: lone[0].run(1)), device)
    steps = args.stack_steps
    # "today" here: the n runs one after another (each its own new step); "new": stacked.
    per = {"today": lambda: sum(timed(lambda t=t: t.run(steps), device) for t in lone) / (n * steps),
           "new": lambda: timed(lambda: stacked.run(steps), device) / (n * steps)}
    r = rounds(per, roof, args.rounds)
    r["gemm_new"] = [g / n for g in r["gemm"]]  # per model-step
    r["gemm_today"] = [roof_lone.seconds() for _ in r["gemm"]]
    row = row_of(f"{n} × burda1 iwae k=5 reparam", r, roof.flops / n)
    print(f"  stack {row['label']}: sequential {row['today']['rate']:.1f}, stacked {row['new']['rate']:.1f} "
          f"model-steps/s ({100 * row['new']['frac']:.0f}% GEMM)", file=sys.stderr, flush=True)
    return [row]


# ============================================================================ fresh processes

def child(spec: Dict) -> Dict:
    """The measurement a child process makes (python scripts/bench.py --child '<json>')."""
    if spec["setup"] == "vaexp":
        info = runtime.setup(jobs=spec.get("jobs", 1))
    else:  # today: torch's defaults (one thread per core, spinning waits), subnormals kept
        info = {"flush_denormal": False, "threads": torch.get_num_threads()}
        torch.set_flush_denormal(False)
    device = torch.device(spec["device"])
    sizes = TINY_MODELS if spec["tiny"] else MODELS
    data, _ = load_data(spec["data"], device, n_train=2000)
    t = Trainer([vaexp_model(spec["model"], spec.get("seed", 0), data, device, sizes)],
                [StepSpec("iwae", spec["estimator"], 1, spec["k"])], [spec.get("seed", 0)], data, device, True)
    t.run(spec["warmup"])
    if spec.get("barrier"):  # jobs at once: every job starts timing once all have warmed up
        folder, n = Path(spec["barrier"]), spec["jobs"]
        (folder / f"ready.{spec['seed']}").touch()
        while len(list(folder.glob("ready.*"))) < n:
            time.sleep(0.01)
    start, done = time.perf_counter(), 0
    while done < spec["steps"] or time.perf_counter() - start < spec.get("min_seconds", 0):
        t.run(1)
        done += 1
    sync(device)
    seconds = time.perf_counter() - start
    return {"steps": done, "seconds": seconds, "rate": done / seconds, "threads": str(info.get("threads")),
            "flush": info.get("flush_denormal"), "end_threads": torch.get_num_threads()}


def spawn(spec: Dict, env: Optional[Dict] = None) -> subprocess.Popen:
    """A fresh process for one measurement; it runs the eager step (VAEXP_COMPILE=0: no compilation
    at start) unless `env` says otherwise, and torch's thread settings as the user's shell has them."""
    env = {**os.environ, "VAEXP_COMPILE": "0", **(env or {})}
    return subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE,
                            text=True, env=env)


def result(proc: subprocess.Popen) -> Dict:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"bench child failed with status {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def busy(seconds: float) -> subprocess.Popen:
    """One other busy process: a 2-thread PyTorch matmul loop with torch's default settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    return subprocess.Popen([sys.executable, "-c", BUSY, str(seconds)], env=env)


def base_spec(args, **kw) -> Dict:
    spec = {"device": args.device_name, "tiny": args.tiny_models, "data": args.data, "model": "burda1",
            "estimator": "reparam", "k": 5, "warmup": args.warmup, "steps": args.child_steps, "min_seconds": 0}
    spec.update(kw)
    return spec


def flush_rows(args) -> List[Dict]:
    rows = []
    for setup in ("today", "vaexp"):
        rates = []
        for _ in range(args.child_rounds):
            env = {"VAEXP_THREADS": "1", "OMP_NUM_THREADS": "1", "VAEXP_COMPILE": os.environ.get("VAEXP_COMPILE", "1")}
            rates.append(result(spawn(base_spec(args, setup=setup, k=50, warmup=2, steps=args.child_steps), env))["rate"])
        rows.append({"label": "subnormals kept (today)" if setup == "today" else "flushed (vaexp)",
                     "rate": statistics.median(rates), "spread": (min(rates), max(rates))})
    print("  flush: " + ", ".join(f"{r['label']} {r['rate']:.1f}/s" for r in rows), file=sys.stderr, flush=True)
    return rows


def shared_rows(args) -> List[Dict]:
    rows = []
    secs = args.child_seconds
    for k in args.shared_k:
        for setup in ("today", "vaexp"):
            solo, shared = [], []
            for _ in range(args.child_rounds):
                spec = base_spec(args, setup=setup, k=k, steps=1, min_seconds=secs)
                solo.append(result(spawn(spec))["rate"])
                hog = busy(secs + 30)
                time.sleep(0.5)
                try:
                    shared.append(result(spawn(spec))["rate"])
                finally:
                    hog.kill()
                    hog.wait()
            rows.append({"label": f"burda1 k={k}, {'torch defaults (today)' if setup == 'today' else 'vaexp.runtime.setup'}",
                         "solo": statistics.median(solo), "shared": statistics.median(shared),
                         "kept": statistics.median(s / o for s, o in zip(shared, solo))})
            print(f"  shared {rows[-1]['label']}: alone {rows[-1]['solo']:.1f}/s, next to a busy process "
                  f"{rows[-1]['shared']:.1f}/s ({100 * rows[-1]['kept']:.0f}% kept)", file=sys.stderr, flush=True)
    return rows


def jobs_rows(args) -> List[Dict]:
    """n jobs one after another (each the machine's threads) vs at once (cores/n threads each, as
    vaexp.runtime.setup gives a job of hydra/launcher=parallel), steady-state steps/s of all jobs."""
    import tempfile

    n, secs = args.jobs, args.child_seconds
    seq, par = [], []
    for _ in range(args.child_rounds):
        rates = [result(spawn(base_spec(args, setup="vaexp", jobs=1, seed=j, steps=1, min_seconds=secs)))["rate"]
                 for j in range(n)]
        seq.append(n / sum(1 / r for r in rates))  # n jobs of S steps in sequence: n·S / Σ S/rate_j
        with tempfile.TemporaryDirectory() as barrier:
            procs = [spawn(base_spec(args, setup="vaexp", jobs=n, seed=j, steps=1, min_seconds=secs, barrier=barrier))
                     for j in range(n)]
            par.append(sum(result(p)["rate"] for p in procs))
    row = {"label": f"{n} jobs of burda1 iwae k=5", "sequential": statistics.median(seq),
           "parallel": statistics.median(par), "ratio": statistics.median(p / s for p, s in zip(par, seq))}
    print(f"  jobs: one after another {row['sequential']:.1f}, at once {row['parallel']:.1f} steps/s",
          file=sys.stderr, flush=True)
    return [row]


# ============================================================================ the typical loop

class _Gauss(nn.Module):
    def __init__(self, n_in: int, width: int, n_out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh())
        self.mu, self.logstd = nn.Linear(width, n_out), nn.Linear(width, n_out)

    def forward(self, h):
        h = self.net(h)
        return self.mu(h), self.logstd(h)


class TypicalIWAE(nn.Module):
    """An IWAE as public implementations usually write it: x repeated k times through the
    encoder, torch.distributions for the densities, one loss."""

    def __init__(self, latents: Sequence[int], hidden: Sequence[int], x_dim: int = 784):
        super().__init__()
        ins = [x_dim] + list(latents[:-1])
        self.enc = nn.ModuleList(_Gauss(ins[i], hidden[i], latents[i]) for i in range(len(latents)))
        self.dec0 = nn.Sequential(nn.Linear(latents[0], hidden[0]), nn.Tanh(), nn.Linear(hidden[0], hidden[0]),
                                  nn.Tanh(), nn.Linear(hidden[0], x_dim))
        self.dec = nn.ModuleList(_Gauss(latents[i + 1], hidden[i + 1], latents[i]) for i in range(len(latents) - 1))

    def log_weights(self, x: Tensor, k: int) -> Tensor:
        b = x.shape[0]
        x_rep = x.repeat(k, 1)
        h, log_q, zs = x_rep, 0.0, []
        for layer in self.enc:
            mu, logstd = layer(h)
            q = torch.distributions.Normal(mu, logstd.exp())
            z = q.rsample()
            log_q = log_q + q.log_prob(z).sum(-1)
            zs.append(z)
            h = z
        log_p = -F.binary_cross_entropy_with_logits(self.dec0(zs[0]), x_rep, reduction="none").sum(-1)
        for i, layer in enumerate(self.dec, start=1):
            mu, logstd = layer(zs[i])
            log_p = log_p + torch.distributions.Normal(mu, logstd.exp()).log_prob(zs[i - 1]).sum(-1)
        log_p = log_p + torch.distributions.Normal(torch.zeros_like(zs[-1]), torch.ones_like(zs[-1])).log_prob(zs[-1]).sum(-1)
        return (log_p - log_q).view(k, b)


def typical_rows(args, data, device, sizes) -> List[Dict]:
    rows = []
    train_cpu = data.train.detach().cpu()
    for name, k in (("burda1", 5), ("burda1", 50)):
        torch.manual_seed(0)
        model = TypicalIWAE(*sizes[name], x_dim=train_cpu.shape[1]).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-4)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(train_cpu), batch_size=BATCH,
                                             shuffle=True, drop_last=True)
        batches = iter(loader)

        def typical(n):
            nonlocal batches
            for _ in range(n):
                try:
                    (xb,) = next(batches)
                except StopIteration:
                    batches = iter(loader)
                    (xb,) = next(batches)
                opt.zero_grad()
                loss = -(torch.logsumexp(model.log_weights(torch.bernoulli(xb).to(device), k), 0) - math.log(k)).mean()
                loss.backward()
                opt.step()
                loss.item()

        new = Trainer([vaexp_model(name, 0, data, device, sizes)], [StepSpec("iwae", "reparam", 1, k)], [0], data,
                      device, True)
        typical(args.warmup)
        new.run(args.warmup)
        t_typ, t_new = [], []
        for _ in range(args.rounds):
            t_typ.append(timed(lambda: typical(args.steps), device))
            t_new.append(timed(lambda: new.run(args.steps), device))
        rows.append({"label": f"{name} iwae k={k} reparam", "typical": statistics.median(args.steps / t for t in t_typ),
                     "new": statistics.median(args.steps / t for t in t_new),
                     "ratio": statistics.median(a / b for a, b in zip(t_typ, t_new))})
        print(f"  typical {rows[-1]['label']}: typical {rows[-1]['typical']:.1f}/s, vaexp {rows[-1]['new']:.1f}/s",
              file=sys.stderr, flush=True)
    return rows


# ============================================================================ the report

def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def roof_table(rows: List[Dict], what: str, unit: str) -> str:
    header = [what, f"today ({unit})", "GFLOP/s", "% GEMM", f"new ({unit})", "GFLOP/s", "% GEMM", "new / today",
              "GEMM rate (GFLOP/s)", "ATen's alone"]
    body = []
    for r in rows:
        t, n = r["today"], r["new"]
        label = r["label"] + (f" ({r['fast']})" if r.get("fast") not in (None, "eager") else "")
        body.append([label, f"{t['rate']:.1f}", f"{t['gflops']:.0f}", f"{100 * t['frac']:.0f}%", f"{n['rate']:.1f}",
                     f"{n['gflops']:.0f}", f"{100 * n['frac']:.0f}%", f"{r['speedup']:.2f}×", f"{r['gemm_gflops']:.0f}",
                     "–" if r.get("aten_gflops") is None else f"{r['aten_gflops']:.0f}"])
    return table(header, body)


def report(res: Dict[str, List[Dict]], args, device: torch.device, data_name: str, setup: Dict) -> str:
    out = [f"Device: {describe(device)}; process set-up: {setup}. Data: {data_name}. Batch {BATCH}; "
           f"{args.rounds} interleaved round(s) of {args.steps} steps (medians). "
           f"% GEMM = time of the row's own GEMMs alone / its measured time."]
    if res.get("train"):
        out += ["", roof_table(res["train"], "training step", "steps/s")]
    if res.get("eval"):
        e = res["eval"][0]
        out += ["", roof_table(res["eval"], "test NLL", "images/s"), "",
                f"NLL today {e['nll_today']:.4f}, new {e['nll_new']:.4f} (same ε; they differ by float rounding)."]
        if e.get("tf32") is not None:
            out.append(f"TF32 matmuls would change this NLL by {e['tf32']:+.4f} nats (vaexp evaluates with TF32 off).")
    if res.get("stack"):
        s = res["stack"][0]
        out += ["", table(["N models of one shape", "one after another (model-steps/s)", "% GEMM",
                           "stacked (model-steps/s)", "% GEMM", "stacked / sequential"],
                          [[s["label"], f"{s['today']['rate']:.1f}", f"{100 * s['today']['frac']:.0f}%",
                            f"{s['new']['rate']:.1f}", f"{100 * s['new']['frac']:.0f}%", f"{s['speedup']:.2f}×"]])]
    if res.get("flush"):
        out += ["", table(["burda1 k=50 from initialisation, 1 thread, fresh process", "steps/s (min–max)"],
                          [[r["label"], f"{r['rate']:.1f} ({r['spread'][0]:.1f}–{r['spread'][1]:.1f})"] for r in res["flush"]])]
    if res.get("shared"):
        out += ["", table(["threads", "alone (steps/s)", "next to a busy 2-thread process", "kept"],
                          [[r["label"], f"{r['solo']:.1f}", f"{r['shared']:.1f}", f"{100 * r['kept']:.0f}%"]
                           for r in res["shared"]])]
    if res.get("jobs"):
        j = res["jobs"][0]
        out += ["", table(["jobs", "one after another (steps/s)", "at once, cores/n threads each (steps/s)", "at once / one after another"],
                          [[j["label"], f"{j['sequential']:.1f}", f"{j['parallel']:.1f}", f"{j['ratio']:.2f}×"]])]
    if res.get("typical"):
        out += ["", table(["training step", "typical loop (steps/s)", "vaexp new (steps/s)", "vaexp / typical"],
                          [[r["label"], f"{r['typical']:.1f}", f"{r['new']:.1f}", f"{r['ratio']:.2f}×"] for r in res["typical"]])]
    return "\n".join(out)


# The one list of sections, in the order of the module docstring: name -> its rows(args, data, device, sizes).
SECTIONS = {"train": train_rows, "eval": eval_rows, "stack": stack_rows,
            "flush": lambda args, data, device, sizes: flush_rows(args),
            "shared": lambda args, data, device, sizes: shared_rows(args),
            "jobs": lambda args, data, device, sizes: jobs_rows(args), "typical": typical_rows}


def parse(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    p.add_argument("--small", action="store_true", help="CPU-sized defaults: 40 steps, 5 test images, 4 models")
    p.add_argument("--tiny-models", action="store_true", help="tiny layer widths (for smoke tests)")
    p.add_argument("--steps", type=int, help="timed training steps per round (default 200, --small 40)")
    p.add_argument("--stack-steps", type=int, help="timed steps per model and round in the stack section (default --steps)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 20, --small 5)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per row (medians; default 3)")
    p.add_argument("--n-test", type=int, help="test images for the K=5000 NLL (default 10000, --small 26: two draw blocks)")
    p.add_argument("--eval-k", type=int, default=5000, help="importance samples for the NLL (default 5000)")
    p.add_argument("--models", type=int, help="N, models per stack (default 7, --small 4)")
    p.add_argument("--jobs", type=int, default=2, help="n, jobs at once in the jobs section (default 2)")
    p.add_argument("--child-steps", type=int, help="steps per fresh process in the flush section (default 300, "
                   "--small 100)")
    p.add_argument("--child-seconds", type=float, default=None, help="timed seconds per fresh process in the "
                   "shared and jobs sections (default 10, --small 5)")
    p.add_argument("--child-rounds", type=int, default=None, help="repeats of each fresh-process measurement "
                   "(default: --rounds)")
    p.add_argument("--shared-k", default="5,50", help="k of the shared section's rows (comma-separated)")
    p.add_argument("--sections", default="train,eval,stack,flush,shared,jobs",
                   help=f"{', '.join(SECTIONS)} (comma-separated)")
    p.add_argument("--train", default=None, help="the train section's rows, model:k:estimator, comma-separated "
                   f"(default all: {','.join(map(config_name, TRAIN_CONFIGS))})")
    p.add_argument("--data", default="auto", choices=["auto", "mnist", "synthetic"])
    p.add_argument("--threads", type=int, default=None, help="fixed intra-op threads (default: vaexp.runtime.setup's governor)")
    p.add_argument("--markdown", default=None, help="also write the tables to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    small = args.small
    args.steps = args.steps or (40 if small else 200)
    args.stack_steps = args.stack_steps or args.steps
    args.warmup = args.warmup if args.warmup is not None else (5 if small else 20)
    args.n_test = args.n_test or (26 if small else 10000)
    args.models = args.models or (4 if small else 7)
    args.child_steps = args.child_steps or (100 if small else 300)
    args.child_seconds = args.child_seconds if args.child_seconds is not None else (5.0 if small else 10.0)
    args.child_rounds = args.child_rounds or args.rounds
    args.shared_k = [int(v) for v in args.shared_k.split(",") if v.strip()]
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        p.error(f"--sections: no section {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    names = {config_name(c): c for c in TRAIN_CONFIGS}
    chosen = [s.strip() for s in args.train.split(",") if s.strip()] if args.train is not None else list(names)
    unknown = [s for s in chosen if s not in names]
    if unknown or not chosen:
        p.error(f"--train: no row {', '.join(unknown) or '(none given)'}; choose from {', '.join(names)}")
    args.train = [names[s] for s in chosen]
    return args


def main(argv: Optional[Sequence[str]] = None) -> str:
    args = parse(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return ""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    args.device_name = str(device)
    runtime.tune_cpu_allocator()
    setup = runtime.setup(threads=args.threads)
    data, data_name = load_data(args.data, device, n_train=max(2000, BATCH * (args.steps + args.warmup + 1)))
    sizes = TINY_MODELS if args.tiny_models else MODELS
    res = {}
    for name in args.sections:
        print(f"bench: {name} on {device}", file=sys.stderr, flush=True)
        res[name] = SECTIONS[name](args, data, device, sizes)
    text = report(res, args, device, data_name, setup)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
