#!/usr/bin/env python
"""vaexp's speed, side by side with the way IWAE code is usually written, in one run.

    python scripts/bench.py                  # full sizes (minutes on a GPU, long on a CPU)
    python scripts/bench.py --small          # CPU-sized: fewer steps, 20 test images, 4 models
    python scripts/bench.py --small --repeat 3 --markdown bench.md

Three sections, each a table of ratios against a baseline measured in the same run:

1. training steps/s at batch 20: vaexp's step (data on the device, per-epoch binarisation on the
   device, no host sync, the encoder run once per x, θ and φ from their own surrogates, fused Adam
   on a CPU; on CUDA also the whole step as a captured CUDA graph, vaexp.training.capture) against a *typical*
   implementation: a
   CPU DataLoader over a TensorDataset with per-batch torch.bernoulli, `.to(device)`, the
   encoder run on x repeated k times, torch.distributions log-densities, one backward over one
   loss (two autograd.grad calls for DReG), and `.item()` every step;
2. test NLL with K = 5000: vaexp.evaluate.log_likelihoods against a per-example loop (each
   image repeated K times through the same network, `.item()` per image), on the same images
   and the same weights; both NLLs are printed (different ε, so they agree up to Monte Carlo
   noise); on CUDA also how much TF32 matmuls would move the NLL;
3. N models of one shape: trained stacked (vaexp.training.step.StackedStep) against the same N
   trained one after another with vaexp's own step, as model-steps per second.

The process tunes glibc's allocator as the vaexp CLI does (vaexp.runtime.tune_cpu_allocator; it
applies to the baselines too; --no-malloc-tuning to skip). Peak device memory per row: torch.cuda.max_memory_allocated on CUDA; on a CPU there is no
per-section allocator statistic, so the rows say n/a and the process's peak RSS is printed once.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vaexp import evaluate as ev  # noqa: E402
from vaexp.data import load_dataset  # noqa: E402
from vaexp.models.burda import VAE  # noqa: E402
from vaexp.runtime import tune_cpu_allocator  # noqa: E402
from vaexp.training import capture  # noqa: E402
from vaexp.training.loop import EpochData  # noqa: E402
from vaexp.training.step import StepSpec, make_step  # noqa: E402

BATCH = 20
SCHEDULE = SimpleNamespace(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-4)  # Burda et al.'s Adam
MODELS = {"burda1": ([50], [200]), "burda2": ([100, 50], [200, 100])}
TINY_MODELS = {"burda1": ([4], [16]), "burda2": ([6, 4], [16, 8])}
NARROW = ([8], [32])  # a deliberately small MLP: there the per-op overhead, not arithmetic, dominates


# ============================================================================ devices and timing

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> Optional[float]:
    """Peak allocated device memory (MiB) since reset_peak; None on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return None


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2 ** 30:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}"
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"CPU {model or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"with {torch.get_num_threads()} intra-op threads")


def timed(fn: Callable[[], None], device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


# ============================================================================ data

def load_data(kind: str, device: torch.device, n_train: int):
    """MNIST from the user cache (no download), else small synthetic images."""
    if kind in ("auto", "mnist"):
        cfg = SimpleNamespace(name="mnist", path=None, data_dir=None, n_valid=400, binarize_seed=1234, download=False)
        try:
            data = load_dataset(cfg, device)
            return data, "MNIST (cache)"
        except Exception as err:  # noqa: BLE001
            if kind == "mnist":
                raise
            print(f"bench: MNIST not available ({type(err).__name__}); using synthetic images", file=sys.stderr)
    cfg = SimpleNamespace(name="synthetic", n_train=n_train, n_test=200, seed=0, n_valid=0, binarize_seed=1234)
    return load_dataset(cfg, device), f"synthetic ({n_train} training images)"


# ============================================================================ the typical baseline

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

    def log_weights(self, x: Tensor, k: int, stop_q_params: bool = False) -> Tensor:
        B = x.shape[0]
        x_rep = x.repeat(k, 1)
        h, log_q, zs = x_rep, 0.0, []
        for layer in self.enc:
            mu, logstd = layer(h)
            q = torch.distributions.Normal(mu, logstd.exp())
            z = q.rsample()
            if stop_q_params:  # DReG's log q with the encoder's outputs stopped (one layer only)
                q = torch.distributions.Normal(mu.detach(), logstd.exp().detach())
            log_q = log_q + q.log_prob(z).sum(-1)
            zs.append(z)
            h = z
        log_p = -F.binary_cross_entropy_with_logits(self.dec0(zs[0]), x_rep, reduction="none").sum(-1)
        for i, layer in enumerate(self.dec, start=1):
            mu, logstd = layer(zs[i])
            log_p = log_p + torch.distributions.Normal(mu, logstd.exp()).log_prob(zs[i - 1]).sum(-1)
        log_p = log_p + torch.distributions.Normal(torch.zeros_like(zs[-1]), torch.ones_like(zs[-1])).log_prob(zs[-1]).sum(-1)
        return (log_p - log_q).view(k, B)


def typical_train(model_name: str, k: int, dreg: bool, train_cpu: Tensor, device: torch.device, steps: int,
                  warmup: int, sizes) -> float:
    """Steps per second of the typical loop (DataLoader, per-batch bernoulli, .item() per step)."""
    latents, hidden = sizes[model_name]
    torch.manual_seed(0)
    model = TypicalIWAE(latents, hidden, train_cpu.shape[1]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-4)
    enc_params, dec_params = list(model.enc.parameters()), list(model.dec0.parameters()) + list(model.dec.parameters())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(train_cpu), batch_size=BATCH,
                                         shuffle=True, drop_last=True)
    batches = iter(loader)
    history = []

    def one_step():
        nonlocal batches
        try:
            (xb,) = next(batches)
        except StopIteration:
            batches = iter(loader)
            (xb,) = next(batches)
        x = torch.bernoulli(xb).to(device)
        opt.zero_grad()
        if dreg:
            lw = model.log_weights(x, k, stop_q_params=True)
            w = torch.softmax(lw, 0).detach()
            dec_loss = -(w * lw).sum(0).mean()          # IWAE's θ gradient
            enc_loss = -(w ** 2 * lw).sum(0).mean()     # DReG's φ gradient
            g_dec = torch.autograd.grad(dec_loss, dec_params, retain_graph=True)
            g_enc = torch.autograd.grad(enc_loss, enc_params)
            for p, g in zip(dec_params + enc_params, g_dec + g_enc):
                p.grad = g
            loss = -(torch.logsumexp(lw, 0) - math.log(k)).mean()
        else:
            lw = model.log_weights(x, k)
            loss = -(torch.logsumexp(lw, 0) - math.log(k)).mean()
            loss.backward()
        opt.step()
        history.append(loss.item())

    for _ in range(warmup):
        one_step()
    return steps / timed(lambda: [one_step() for _ in range(steps)], device)


# ============================================================================ vaexp's training step

def vaexp_model(model_name: str, seed: int, data, device: torch.device, sizes) -> VAE:
    latents, hidden = sizes[model_name]
    torch.manual_seed(seed)
    return VAE(latents, hidden, x_dim=data.train.shape[1], train_mean=data.train_mean).to(device)


def vaexp_steps(models: Sequence[VAE], specs: Sequence[StepSpec], seeds: Sequence[int], data,
                device: torch.device, steps: int, warmup: int, use_fast: bool):
    """(seconds for `steps` steps, captured?) of the trainer's own step on these models (one: a
    lone run; several: a stack), fed as the trainer feeds it (vaexp.training.loop.EpochData),
    the epoch's binarisation and permutation amortised over the epoch's steps."""
    gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    step = make_step(list(models), list(specs), gens, [None] * len(models), SCHEDULE, device)
    step_fn = capture.captured_step("auto" if use_fast else "false", device, step.opt, step.params,
                                    step.generators, step) or step
    holder = {}
    t_epoch = timed(lambda: holder.update(epoch=EpochData(data, [s + 7 for s in seeds], 0, device)), device)
    epoch = holder["epoch"]
    acc = torch.zeros(len(models), 4, device=device, dtype=torch.float64)
    per_epoch = data.train.shape[0] // BATCH

    def run(n, offset):
        for i in range(offset, offset + n):
            acc.add_(step_fn(epoch.batch(i % per_epoch, BATCH)))

    run(warmup, 0)  # warm-up (and capture) outside the timed part
    seconds = timed(lambda: run(steps, warmup), device) + t_epoch * steps / per_epoch
    float(acc.sum())
    return seconds, getattr(step_fn, "captured", None)


def vaexp_train(model_name: str, k: int, estimator: str, data, device: torch.device, steps: int, warmup: int,
                use_fast: bool, sizes, seed: int = 0):
    """(steps/s, captured?) of one lone run's step."""
    model = vaexp_model(model_name, seed, data, device, sizes)
    seconds, captured = vaexp_steps([model], [StepSpec("iwae", estimator, 1, k)], [seed], data, device, steps,
                                    warmup, use_fast)
    return steps / seconds, captured


# ============================================================================ evaluation

@torch.no_grad()
def typical_nll(model: VAE, x: Tensor, k: int) -> float:
    """Per-example loop: each image repeated K times through the encoder and the decoder."""
    enc, dec = model.encoder[0], model.decoder[0]
    total = 0.0
    for i in range(x.shape[0]):
        x_rep = x[i:i + 1].repeat(k, 1)
        mu, logsig = enc(x_rep)
        q = torch.distributions.Normal(mu, logsig.exp())
        z = q.sample()
        log_p = -F.binary_cross_entropy_with_logits(dec(z), x_rep, reduction="none").sum(-1)
        log_p = log_p + torch.distributions.Normal(torch.zeros_like(z), torch.ones_like(z)).log_prob(z).sum(-1)
        lw = (log_p - q.log_prob(z).sum(-1)).double()
        total += (torch.logsumexp(lw, 0) - math.log(k)).item()
    return -total / x.shape[0]


def vaexp_nll(model: VAE, x: Tensor, k: int, device: torch.device, tf32: bool = False) -> float:
    pass_rows = ev.pass_rows_for(model, device, k)
    report_k = [kk for kk in (1, 64) if kk < k]
    if tf32:
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            ll = ev.log_likelihoods(model, x, k, report_k, ev.DEFAULT_ROWS, 0, pass_rows=pass_rows)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
    else:
        with ev.no_tf32():
            ll = ev.log_likelihoods(model, x, k, report_k, ev.DEFAULT_ROWS, 0, pass_rows=pass_rows)
    return float(-ll["log_px"].mean())


# ============================================================================ stacked vs sequential

def stack_members(kind: str, n: int) -> List[StepSpec]:
    if kind in ("seeds-k5", "narrow-k5"):
        return [StepSpec("iwae", "reparam", 1, 5)] * n
    if kind == "seeds-k1":
        return [StepSpec("iwae", "reparam", 1, 1)] * n
    if kind == "estimators-k5":
        names = ["reparam", "stl", "dreg"]
        return [StepSpec("iwae", names[i % 3], 1, 5) for i in range(n)]
    if kind == "mk64":  # the M·K = 64 line: m = 1, 2, 4, ..., 64 (n of them)
        ms = [2 ** i for i in range(7)][:n]
        return [StepSpec("miwae", "reparam", m, 64 // m) for m in ms]
    raise ValueError(kind)


def sequential_train(specs: Sequence[StepSpec], data, device, steps: int, warmup: int, use_fast: bool, sizes,
                     model_name: str = "burda1") -> float:
    """Seconds for the runs trained one after another, `steps` steps each (each pays its own warm-up
    and capture outside the timed part)."""
    return sum(vaexp_steps([vaexp_model(model_name, i, data, device, sizes)], [spec], [i], data, device, steps,
                           warmup, use_fast)[0] for i, spec in enumerate(specs))


def stacked_train(specs: Sequence[StepSpec], data, device, steps: int, warmup: int, use_fast: bool, sizes,
                  model_name: str = "burda1"):
    models = [vaexp_model(model_name, i, data, device, sizes) for i in range(len(specs))]
    return vaexp_steps(models, specs, list(range(len(specs))), data, device, steps, warmup, use_fast)


# ============================================================================ the run

def fmt_mem(mib: Optional[float]) -> str:
    return "n/a" if mib is None else f"{mib:.0f} MiB"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def run_once(args, device: torch.device, data, sizes) -> Dict[str, List]:
    results: Dict[str, List] = {"train": [], "eval": [], "stack": []}
    train_cpu = data.train.detach().cpu()
    use_fast = args.fast and device.type == "cuda"
    if "train" in args.sections:
        configs = [("burda1", 1, "reparam"), ("burda1", 5, "reparam"), ("burda1", 50, "reparam"),
                   ("burda2", 50, "reparam"), ("burda1", 50, "dreg")]
        for name, k, estimator in configs:
            reset_peak(device)
            base = typical_train(name, k, estimator == "dreg", train_cpu, device, args.steps, args.warmup, sizes)
            base_mem = peak(device)
            reset_peak(device)
            eager, _ = vaexp_train(name, k, estimator, data, device, args.steps, args.warmup, False, sizes)
            eager_mem = peak(device)
            row = {"config": f"{name} iwae k={k} {estimator}", "baseline": base, "eager": eager,
                   "baseline_mem": base_mem, "eager_mem": eager_mem, "fast": None, "captured": None, "fast_mem": None}
            if use_fast:
                reset_peak(device)
                row["fast"], row["captured"] = vaexp_train(name, k, estimator, data, device, args.steps, args.warmup,
                                                           True, sizes)
                row["fast_mem"] = peak(device)
            results["train"].append(row)
            print(f"  train {row['config']}: baseline {base:.1f}/s, vaexp eager {eager:.1f}/s"
                  + (f", captured {row['fast']:.1f}/s" if row["fast"] else ""), file=sys.stderr, flush=True)
    if "eval" in args.sections:
        model = vaexp_model("burda1", 0, data, device, sizes).eval()
        x = data.test[:args.n_test]
        typical_nll(model, x[:1], args.eval_k)  # warm-up
        vaexp_nll(model, x[:1], args.eval_k, device)
        reset_peak(device)
        holder = {}
        t_base = timed(lambda: holder.update(base=typical_nll(model, x, args.eval_k)), device)
        base_mem = peak(device)
        reset_peak(device)
        t_vaexp = timed(lambda: holder.update(vaexp=vaexp_nll(model, x, args.eval_k, device)), device)
        vaexp_mem = peak(device)
        tf32 = None
        if device.type == "cuda":
            tf32 = vaexp_nll(model, x, args.eval_k, device, tf32=True) - holder["vaexp"]
        results["eval"].append({"n": x.shape[0], "k": args.eval_k, "t_base": t_base, "t_vaexp": t_vaexp,
                                "nll_base": holder["base"], "nll_vaexp": holder["vaexp"], "tf32": tf32,
                                "base_mem": base_mem, "vaexp_mem": vaexp_mem})
        print(f"  eval K={args.eval_k} on {x.shape[0]} images: loop {t_base:.2f} s, vaexp {t_vaexp:.2f} s",
              file=sys.stderr, flush=True)
    if "stack" in args.sections:
        for kind in args.stacks:
            members = stack_members(kind, args.models if kind != "mk64" else min(args.models, 7))
            if kind == "mk64" and args.models < 2:
                continue
            n = len(members)
            kind_sizes = {**sizes, "narrow": NARROW}
            name = "narrow" if kind.startswith("narrow") else "burda1"
            reset_peak(device)
            t_seq = sequential_train(members, data, device, args.stack_steps, args.warmup, use_fast, kind_sizes, name)
            seq_mem = peak(device)
            reset_peak(device)
            t_stack, captured = stacked_train(members, data, device, args.stack_steps, args.warmup, use_fast,
                                              kind_sizes, name)
            stack_mem = peak(device)
            results["stack"].append({"kind": kind, "n": n, "seq": n * args.stack_steps / t_seq,
                                     "stack": n * args.stack_steps / t_stack, "captured": captured,
                                     "seq_mem": seq_mem, "stack_mem": stack_mem})
            print(f"  stack {kind} x{n}: sequential {n * args.stack_steps / t_seq:.1f} model-steps/s, "
                  f"stacked {n * args.stack_steps / t_stack:.1f}", file=sys.stderr, flush=True)
    return results


def spread(values: Sequence[float], digits: int = 2) -> str:
    """median, and (min–max) when there is more than one repeat."""
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def report(runs: List[Dict[str, List]], args, device: torch.device, data_name: str) -> str:
    out = [f"Device: {describe(device)}. Data: {data_name}. Batch {BATCH}; {args.steps} timed training steps "
           f"({args.stack_steps} per model when stacking) after {args.warmup} warm-up steps; "
           f"{len(runs)} repeat(s): median (min–max). glibc allocator tuned as vaexp's CLI does: "
           f"{'yes (baselines too)' if args.malloc_tuned else 'no'}."]
    cuda = device.type == "cuda"
    if runs[0]["train"]:
        header = ["training step", "typical loop (steps/s)", "vaexp eager (steps/s)", "eager / typical"]
        if cuda:
            header += ["vaexp captured (steps/s)", "captured / typical"]
        header += ["peak memory typical / eager" + (" / captured" if cuda else "")]
        rows = []
        for i, first in enumerate(runs[0]["train"]):
            rs = [r["train"][i] for r in runs]
            row = [first["config"], spread([r["baseline"] for r in rs], 1), spread([r["eager"] for r in rs], 1),
                   spread([r["eager"] / r["baseline"] for r in rs]) + "×"]
            if cuda:
                cap = all(r["captured"] for r in rs)
                row += [spread([r["fast"] for r in rs], 1) + ("" if cap else " (not captured)"),
                        spread([r["fast"] / r["baseline"] for r in rs]) + "×"]
            mems = [fmt_mem(first["baseline_mem"]), fmt_mem(first["eager_mem"])] + ([fmt_mem(first["fast_mem"])] if cuda else [])
            row.append(" / ".join(mems) if cuda else "n/a (CPU)")
            rows.append(row)
        out += ["", table(header, rows)]
    if runs[0]["eval"]:
        rs = [r["eval"][0] for r in runs]
        e = rs[0]
        header = ["test NLL", "per-example loop (s)", "vaexp (s)", "vaexp / loop speed", "NLL loop", "NLL vaexp",
                  "peak memory loop / vaexp"]
        rows = [[f"K={e['k']}, {e['n']} images", spread([r["t_base"] for r in rs]), spread([r["t_vaexp"] for r in rs]),
                 spread([r["t_base"] / r["t_vaexp"] for r in rs]) + "×", f"{e['nll_base']:.2f}", f"{e['nll_vaexp']:.2f}",
                 f"{fmt_mem(e['base_mem'])} / {fmt_mem(e['vaexp_mem'])}" if cuda else "n/a (CPU)"]]
        out += ["", table(header, rows)]
        out.append("")
        out.append(f"TF32 matmuls would change this NLL by {e['tf32']:+.4f} nats (vaexp evaluates with TF32 off)."
                   if e["tf32"] is not None else "TF32: n/a on a CPU (TF32 is a CUDA matmul mode; vaexp evaluates with it off).")
    if runs[0]["stack"]:
        header = ["N models of one shape", "one after another (model-steps/s)", "stacked (model-steps/s)",
                  "stacked / sequential", "peak memory sequential / stacked"]
        rows = []
        for i, first in enumerate(runs[0]["stack"]):
            rs = [r["stack"][i] for r in runs]
            label = {"seeds-k5": "seeds, burda1 iwae k=5", "seeds-k1": "seeds, burda1 iwae k=1",
                     "estimators-k5": "reparam/stl/dreg, burda1 iwae k=5",
                     "mk64": "M·K=64 line, burda1 miwae m=1,2,4,...",
                     "narrow-k5": "seeds, narrow 784-32-32-8 iwae k=5"}[first["kind"]]
            cap = "" if not cuda else (" (captured)" if all(r["captured"] for r in rs) else " (eager)")
            rows.append([f"{first['n']} × {label}{cap}", spread([r["seq"] for r in rs], 1),
                         spread([r["stack"] for r in rs], 1), spread([r["stack"] / r["seq"] for r in rs]) + "×",
                         f"{fmt_mem(first['seq_mem'])} / {fmt_mem(first['stack_mem'])}" if cuda else "n/a (CPU)"])
        out += ["", table(header, rows)]
    if not cuda:
        out += ["", f"Peak RSS of the benchmark process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB."]
    return "\n".join(out)


def parse(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    p.add_argument("--small", action="store_true", help="CPU-sized defaults: 100 steps, 20 test images, 4 models")
    p.add_argument("--tiny-models", action="store_true", help="tiny layer widths (for smoke tests)")
    p.add_argument("--steps", type=int, help="timed training steps per configuration (default 1000, --small 100)")
    p.add_argument("--stack-steps", type=int, help="timed steps per model in the stack section (default: --steps)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 20, --small 5)")
    p.add_argument("--n-test", type=int, help="test images for the K=5000 NLL (default 10000, --small 20)")
    p.add_argument("--eval-k", type=int, default=5000, help="importance samples for the NLL (default 5000)")
    p.add_argument("--models", type=int, help="N, models per stack (default 7, --small 4)")
    p.add_argument("--stacks", default="seeds-k5,seeds-k1,estimators-k5,mk64,narrow-k5",
                   help="which stacks: seeds-k5, seeds-k1, estimators-k5, mk64, narrow-k5 (a small MLP whose "
                        "step is launch/dispatch-bound) (comma-separated)")
    p.add_argument("--sections", default="train,eval,stack", help="train, eval, stack (comma-separated)")
    p.add_argument("--data", default="auto", choices=["auto", "mnist", "synthetic"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--repeat", type=int, default=1, help="run everything this many times; tables show the spread")
    p.add_argument("--no-fast", dest="fast", action="store_false", help="CUDA: skip the captured-step column")
    p.add_argument("--no-malloc-tuning", dest="malloc", action="store_false",
                   help="leave glibc's allocator as it is (vaexp's CLI tunes it: vaexp.runtime.tune_cpu_allocator; "
                        "in this one process the tuning applies to the baselines as well)")
    p.add_argument("--markdown", default=None, help="also write the tables to this file")
    args = p.parse_args(argv)
    small = args.small
    args.steps = args.steps or (100 if small else 1000)
    args.stack_steps = args.stack_steps or args.steps
    args.warmup = args.warmup if args.warmup is not None else (5 if small else 20)
    args.n_test = args.n_test or (20 if small else 10000)
    args.models = args.models or (4 if small else 7)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    args.stacks = [s.strip() for s in args.stacks.split(",") if s.strip()]
    return args


def main(argv: Optional[Sequence[str]] = None) -> str:
    args = parse(argv)
    args.malloc_tuned = tune_cpu_allocator() if args.malloc else False
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    data, data_name = load_data(args.data, device, n_train=max(200, BATCH * (args.steps + args.warmup + 1)))
    sizes = TINY_MODELS if args.tiny_models else MODELS
    runs = []
    for r in range(args.repeat):
        print(f"bench: repeat {r + 1}/{args.repeat} on {device}", file=sys.stderr, flush=True)
        runs.append(run_once(args, device, data, sizes))
    text = report(runs, args, device, data_name)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
