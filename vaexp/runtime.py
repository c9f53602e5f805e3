"""Process set-up that every computing command (and scripts/bench.py) applies before it computes.

:func:`setup` (the CLI calls it first thing in train/eval/snr jobs): subnormal floats flushed to
zero, the intra-op thread count from the cores actually free (a governor keeps it there while
the run goes on; the count stays fixed where GEMMs depend on it: :func:`ask_strict_gemm`), and
on CUDA one GPU per parallel job. :func:`tune_cpu_allocator` (the CLI, at start) keeps big CPU
temporaries mapped. Invariants: thread counts and the allocator change
speed, never results (a step and the evaluation are bit-identical with 1 and 2 threads:
tests/test_runtime.py); flushing subnormals changes results in the last bits against a run that
does not flush (every vaexp process flushes unless VAEXP_FLUSH_DENORMAL=0, so resumed runs match
bit for bit). Importing this module does not import torch (`vaexp --help` stays quick).
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

FLUSH_ENV = "VAEXP_FLUSH_DENORMAL"   # "0": keep IEEE gradual underflow
THREADS_ENV = "VAEXP_THREADS"        # a fixed intra-op thread count (no governor)
COMPILE_ENV = "VAEXP_COMPILE"        # "0": no torch.compile'd path (the plain formula, the eager step)
GEMM_ENV = "VAEXP_GEMM"              # the dense layers' GEMM kernel (vaexp.models.dense)
GEMM_BACKENDS = ("auto", "onednn", "aten")
MKL_CBWR_ENV = "MKL_CBWR"            # MKL's numerical-reproducibility mode, read at its first GEMM
STRICT_GEMM = "AUTO,STRICT"
# The governor: how often it samples /proc/stat, and how much of a core other processes may use
# before a thread gives way (0.3: a shell or an editor does not count; a busy process does).
SAMPLE_S = 0.25
SLACK = 0.3


def env_problem() -> Optional[str]:
    """One line naming a vaexp environment variable with a value it cannot take, or None."""
    threads = os.environ.get(THREADS_ENV)
    if threads and not (threads.strip().isdigit() and int(threads) >= 1):
        return f"{THREADS_ENV}={threads!r}: a thread count must be a whole number >= 1; fix it or unset it"
    gemm = os.environ.get(GEMM_ENV)
    if gemm is not None and gemm not in GEMM_BACKENDS:
        return (f"{GEMM_ENV}={gemm!r}: one of {', '.join(GEMM_BACKENDS)} (auto: oneDNN for big layers on "
                f"non-Intel x86 CPUs, MKL elsewhere); fix it or unset it")
    return None


def tune_cpu_allocator() -> bool:
    """glibc only: serve big allocations from the heap and keep freed memory in the process
    (mallopt M_MMAP_THRESHOLD 1 GiB, M_TRIM_THRESHOLD 2 GiB) instead of mmap-ing and unmapping
    every CPU temporary above 32 MiB, each of which is page-faulted in again on first touch: on a
    2-core VM that made the K=5000 evaluation ~1.8x slower, and a stacked M·K=64 step ~1.4x. The
    cost: the process keeps its peak memory (as CUDA's caching allocator does).
    VAEXP_MALLOC_TUNING=0 leaves the allocator alone. Returns whether it was applied."""
    if os.environ.get("VAEXP_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, (1 << 31) - 1))
    except (OSError, AttributeError):  # not glibc
        return False


def resolve_device(name):
    """The torch.device for a config's device setting (auto: CUDA when present; plain "cuda" is the
    current CUDA device, which :func:`assign_gpu` sets per parallel job on a multi-GPU node)."""
    import torch  # here, not at the top: `vaexp --help` and `vaexp report` never load torch

    name = getattr(name, "value", name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# -- GEMMs whose bits do not depend on the thread count ---------------------------------------------

def ask_strict_gemm() -> None:
    """Ask MKL for its strict reproducibility mode unless the user chose a mode ($MKL_CBWR).

    On Intel CPUs with AVX-512 (a Xeon with AVX-512/AMX, torch 2.13) MKL splits the inner sum of
    float32 GEMMs between threads for many of Burda's shapes (784->200 on <= 100 rows, every dW on
    >= 1000 rows): 1 and 2 threads gave other bits, so the thread governor and a resume on another
    thread count changed results. STRICT makes ?gemm's bits independent of the thread count (the
    same Xeon: 2-thread rates on those shapes within ~10%). MKL reads the variable once, at its
    first GEMM, so `import vaexp` sets it (vaexp/__init__.py); setup() checks it took effect."""
    os.environ.setdefault(MKL_CBWR_ENV, STRICT_GEMM)


_gemm_invariant: Optional[bool] = None


def gemm_thread_invariant() -> bool:
    """Whether float32 GEMMs on shapes MKL would split between threads give the same bits at 1 and
    2 threads in this process (cached: MKL's mode is fixed at its first GEMM)."""
    global _gemm_invariant
    if _gemm_invariant is None:
        import torch

        g = torch.Generator().manual_seed(0)
        a, w = torch.randn(60, 784, generator=g), torch.randn(200, 784, generator=g)
        b, c = torch.randn(1000, 200, generator=g), torch.randn(1000, 100, generator=g)
        old, out = torch.get_num_threads(), []
        try:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                out.append((a @ w.t(), c.t() @ b))  # a forward and a dW product
        finally:
            torch.set_num_threads(old)
        _gemm_invariant = all(torch.equal(x, y) for x, y in zip(*out))
    return _gemm_invariant


# -- subnormals ------------------------------------------------------------------------------------

def flush_denormals() -> bool:
    """Flush subnormal floats to zero (x86 FTZ/DAZ, ARM FZ) unless VAEXP_FLUSH_DENORMAL=0.

    Where they come from (counted per op with a TorchDispatchMode over burda1 k=50 steps): the
    normalised importance weights exp(lw - logsumexp lw) of samples 87+ nats below the best one
    (common early in training), and their products in the backward pass: the expanded gradient
    of lw, softplus_backward and the x·l product over the [rows, 784] logits, then the two
    backward matmuls of the output layer and tanh_backward (~2% of the gradient's entries,
    whole rows of it). Hardware that handles subnormals in microcode slows down ~10-100x on
    them: two AMD Zen VMs showed no penalty, a 2-core AVX-512 Xeon VM 1.78x on burda1 k=50 steps
    from initialisation. The setting is per thread and OpenMP workers copy it when they start:
    call this before the first parallel op (setup() does). Returns whether it is on."""
    if os.environ.get(FLUSH_ENV, "1") == "0":
        return False
    import torch

    return bool(torch.set_flush_denormal(True))


def denormals_flushed() -> bool:
    """Whether a product that underflows into the subnormal range comes out as 0 on every
    thread of an op split across the intra-op threads (a check for tests and the benchmark)."""
    import torch

    x = torch.full((1 << 18,), 1e-20)  # 4 pieces of at least torch's grain size per thread
    return bool(((x * 1e-20) == 0).all())


def free_memory(device) -> Optional[int]:
    """Bytes a new allocation can take on `device` without swapping or an out-of-memory kill
    (CPU: Linux's MemAvailable; CUDA: the driver's free count); None where it is not known."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# -- cores and the thread governor ------------------------------------------------------------------

def cores() -> int:
    """The cores this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def _affinity() -> List[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def cpu_ticks(stat_text: str, cpus: Sequence[int]) -> int:
    """Busy clock ticks (everything but idle and iowait; steal counts: a vCPU the host took is as
    busy for us as one another process holds) summed over `cpus`, from /proc/stat's text."""
    wanted, busy = {f"cpu{c}" for c in cpus}, 0
    for line in stat_text.splitlines():
        parts = line.split()
        if parts and parts[0] in wanted:
            values = [int(v) for v in parts[1:9]]
            busy += sum(values) - values[3] - values[4]
    return busy


def own_ticks(stat_text: str) -> int:
    """utime + stime of a process (all its threads) from its /proc/<pid>/stat text."""
    fields = stat_text.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def threads_for(others_busy: float, n_cores: int, limit: int) -> int:
    """Intra-op threads when other processes keep `others_busy` cores busy: the cores they leave
    free (a thread that has to wait for a descheduled peer at every barrier makes a step 10-100x
    slower, tests/README 'Speed'), at least 1, at most `limit`."""
    return max(1, min(limit, math.floor(n_cores - others_busy + SLACK)))


class Governor:
    """Samples how busy the other processes keep this process's cores (every SAMPLE_S, in a daemon
    thread) and publishes the thread count to use; :func:`adapt_threads`, called by the computing
    loops between steps, applies it in the thread that runs torch (the count is per thread)."""

    def __init__(self, limit: int):
        self.limit, self.cpus = limit, _affinity()
        self.n_cores = min(len(self.cpus), cores())
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.wanted = limit
        self._calm = 0
        self._stop = threading.Event()
        self._last = self._sample()
        self.thread: Optional[threading.Thread] = None

    def _sample(self) -> Optional[Tuple[float, int, int]]:
        try:
            with open("/proc/stat") as f:
                total = cpu_ticks(f.read(), self.cpus)
            with open("/proc/self/stat") as f:
                own = own_ticks(f.read())
        except (OSError, ValueError, IndexError):
            return None
        return time.monotonic(), total, own

    def measure(self, seconds: float) -> Optional[float]:
        """Cores kept busy by other processes since the last sample (blocking `seconds` first)."""
        time.sleep(seconds)
        now = self._sample()
        last, self._last = self._last, now
        if now is None or last is None or now[0] <= last[0]:
            return None
        others = (now[1] - last[1]) - (now[2] - last[2])
        return max(0.0, others / self.hz / (now[0] - last[0]))

    def update(self, others: float) -> int:
        """Fewer threads at once; more only after two calm samples in a row (no flapping)."""
        target = threads_for(others, self.n_cores, self.limit)
        if target < self.wanted:
            self.wanted, self._calm = target, 0
        elif target > self.wanted:
            self._calm += 1
            if self._calm >= 2:
                self.wanted, self._calm = target, 0
        else:
            self._calm = 0
        return self.wanted

    def start(self) -> None:
        def loop():
            while not self._stop.is_set():
                others = self.measure(SAMPLE_S)
                if others is not None:
                    self.update(others)

        self.thread = threading.Thread(target=loop, name="vaexp-thread-governor", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()


_governor: Optional[Governor] = None
_applied: Optional[int] = None
_setup_done: Dict[str, object] = {}


def adapt_threads() -> None:
    """Apply the governor's thread count in the calling thread (cheap: a comparison when it has
    not changed). Called between training steps and evaluation passes."""
    global _applied
    if _governor is not None and _governor.wanted != _applied:
        import torch

        _applied = _governor.wanted
        torch.set_num_threads(_applied)


def hold_threads_for(device) -> None:
    """On CUDA, keep the thread count as it is for the rest of the process (the governor stops).
    The host's threads hardly matter there, while torch.compile guards on the count: every new
    one would recompile the Triton kernels, and could do so inside a CUDA-graph capture."""
    global _governor
    if getattr(device, "type", None) == "cuda" and _governor is not None:
        _governor.stop()
        _governor = None


def compiling() -> bool:
    """Whether vaexp's torch.compile'd paths may be used ($VAEXP_COMPILE is not 0)."""
    return os.environ.get(COMPILE_ENV, "1") != "0"


def compile(fn, **options):
    """torch.compile(fn, **options), with room in Dynamo's per-function cache for one entry per
    thread count the governor may choose: Inductor's CPU kernels bake the count in, so Dynamo
    guards on it and recompiles when it changes; past its default limit of 8 entries a compiled
    function would fall back to eager for good (with fullgraph=True: fail) on a machine with more
    than 8 cores to govern."""
    import torch
    import torch._dynamo

    counts = _governor.limit if _governor is not None else 1
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    setattr(config, name, max(getattr(config, name), counts + 8))
    return torch.compile(fn, **options)


def job_threads(jobs: int, n_cores: Optional[int] = None) -> int:
    """The thread budget of one of `jobs` jobs running at once on this machine's cores."""
    return max(1, (n_cores or cores()) // max(1, jobs))


def setup(jobs: int = 1, threads: Optional[int] = None,
          governor: bool = True) -> Dict[str, object]:
    """Set up this process for computing; idempotent, first call wins. Call it before torch's first
    parallel op (the subnormal setting reaches OpenMP workers only when they start).

    Threads, in order: `threads`; $VAEXP_THREADS; $OMP_NUM_THREADS for a lone job (torch has read
    it, nothing changes); else the cores free now, kept up to date by the governor, at most the
    job's share (cores // jobs; joblib's own OMP_NUM_THREADS in its workers is that too). Returns what was
    set. (A parallel job's GPU: :func:`assign_gpu`, per job.)"""
    global _governor, _applied
    if _setup_done:
        return dict(_setup_done)
    import torch

    budget = job_threads(jobs)
    fixed = threads or (int(os.environ[THREADS_ENV]) if os.environ.get(THREADS_ENV) else None)
    info: Dict[str, object] = {}
    g: Optional[Governor] = None
    if fixed:
        most = fixed
        info["threads"] = fixed
    elif os.environ.get("OMP_NUM_THREADS") and jobs <= 1:
        most = torch.get_num_threads()
        info["threads"] = most
    else:
        g = Governor(budget)
        most = budget
        info["threads"] = f"{budget} at most (governed)"
    # Flush, then check it at the most threads this process will use.
    torch.set_num_threads(most)
    info["flush_denormal"] = flush_denormals()
    if info["flush_denormal"] and not denormals_flushed():
        # torch's OpenMP workers started before this call and keep subnormals: flushing on this
        # thread alone would make results depend on the thread count. Keep them everywhere.
        torch.set_flush_denormal(False)
        info["flush_denormal"] = False
        warnings.warn("vaexp: subnormals are not flushed (torch's worker threads started before "
                      "vaexp.runtime.setup; call it before the first parallel op)", RuntimeWarning, stacklevel=2)
    if g is not None and not gemm_thread_invariant():
        # A governor would change results whenever it changed the count: the cores free now, fixed.
        warnings.warn(f"vaexp: float32 matmuls give other bits at 1 and 2 threads here ({MKL_CBWR_ENV}="
                      f"{os.environ.get(MKL_CBWR_ENV, '<unset>')}, or MKL ran its first matmul before vaexp "
                      f"set {STRICT_GEMM}): the thread count stays fixed for this run, and a resume with "
                      f"another count will differ in the last bits; fix: set {MKL_CBWR_ENV}={STRICT_GEMM} "
                      f"(or import vaexp before torch's first matmul)", RuntimeWarning, stacklevel=2)
        governor = False
    if g is not None:
        g.wanted = threads_for(g.measure(0.1) or 0.0, g.n_cores, budget)  # the cores free now
        torch.set_num_threads(g.wanted)
        _applied = g.wanted
        if governor and sys.platform.startswith("linux"):
            g.start()
            _governor = g
            info["threads"] = f"{g.wanted} (governed, at most {budget})"
        else:
            info["threads"] = g.wanted
    _setup_done.update(info)
    return info


def assign_gpu(jobs: int, job_index: Optional[int], device) -> Optional[int]:
    """On a node with several GPUs, job `job_index` of `jobs` parallel ones (a CUDA job: device
    cuda or auto) runs on GPU job_index % count; called for every job, since a joblib worker
    process runs job after job. Returns the GPU chosen, or None (nothing done: CPU jobs never
    touch CUDA)."""
    name = str(getattr(device, "value", device))
    if jobs <= 1 or job_index is None or name not in ("auto", "cuda"):
        return None
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return None
    torch.cuda.set_device(job_index % torch.cuda.device_count())
    return torch.cuda.current_device()
