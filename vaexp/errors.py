"""The exceptions the CLI turns into one line and an exit status (no traceback), and the one
place that turns any other fault into such a line.

VaexpError: a problem with the user's input or environment; its message names the setting or
file and the fix; exit status 2. Interrupted: training stopped by a signal after checkpointing;
its message says how to continue; exit status 130. Terminated: SIGTERM outside the training
loop (a KeyboardInterrupt, so every `except KeyboardInterrupt` treats it as Ctrl-C).
:func:`fault_line` classifies what else can go wrong (OSError, memory exhaustion, damaged
files) into one line; it is torch-free (allocation failures are recognised by name).
"""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple


class VaexpError(Exception):
    exit_code = 2


def debugging() -> bool:
    """VAEXP_DEBUG=1 or HYDRA_FULL_ERROR=1: show tracebacks as well as the one line."""
    return any(os.environ.get(v, "") not in ("", "0") for v in ("VAEXP_DEBUG", "HYDRA_FULL_ERROR"))


class Interrupted(Exception):
    exit_code = 130

    def __init__(self, run_dir: Path, state: Dict, message: Optional[str] = None):
        super().__init__(message or f"interrupted at epoch {state['epoch'] + 1}, step {state['step']}; "
                                    f"checkpoint saved in {run_dir}. Re-run with resume={run_dir} to continue")
        self.run_dir, self.state = run_dir, state


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would raise KeyboardInterrupt."""


def one_line(err: BaseException, limit: int = 240) -> str:
    """`err` as one line for a message: vaexp's own errors (already written for the user) as they
    are, any other with its type's name (`OSError: ...`), whitespace folded, at most `limit` chars."""
    text = " ".join(str(err).split())
    if not isinstance(err, VaexpError) or not text:
        text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


# -- memory ---------------------------------------------------------------------------------------

_ALLOCATION_WORDS = ("can't allocate memory", "cannot allocate memory", "out of memory", "not enough memory",
                     "failed to allocate")


def is_out_of_memory(err: BaseException) -> bool:
    """MemoryError, torch.OutOfMemoryError (by name: this module is torch-free) or an allocator's
    RuntimeError ("DefaultCPUAllocator: can't allocate memory", "CUDA error: out of memory")."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    return isinstance(err, RuntimeError) and any(w in str(err).lower() for w in _ALLOCATION_WORDS)


def allocation_detail(err: BaseException) -> str:
    text = " ".join(str(err).split())
    marker = "you tried to allocate "
    if marker in text:  # torch's CPU allocator names the size: keep that part only
        size = text.split(marker, 1)[1].split(" bytes", 1)[0]
        if size.isdigit():
            return f"an allocation of {int(size) / 2 ** 30:.3g} GiB failed"
    if "Tried to allocate" in text:  # CUDA: "Tried to allocate 2.00 GiB. GPU 0 has ..."
        return "tried to allocate " + text.split("Tried to allocate", 1)[1].split(". ", 1)[0].strip()
    return "the allocation failed"


@contextlib.contextmanager
def memory_hint(doing: str, lower: str) -> Iterator[None]:
    """Turn memory exhaustion inside the block into a VaexpError: 'out of memory <doing>: <what
    failed>; lower <lower>'."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - re-raised unless it is an allocation failure
        if not is_out_of_memory(err):
            raise
        raise VaexpError(f"out of memory {doing}: {allocation_detail(err)}; lower {lower}") from None


# -- files ------------------------------------------------------------------------------------------

def os_error_line(err: OSError, near: Optional[Path] = None) -> str:
    """One line for a failed file operation: what, where (`near` when the error names no file,
    e.g. TensorBoard's writer), and what to do."""
    where = err.filename if err.filename is not None else (f"a file in {near}" if near else "a file")
    if err.filename2 is not None:
        where = f"{err.filename} -> {err.filename2}"
    code = err.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return (f"no space left on the device for {where}; free some space (or use another disk: out_root= / "
                f"hydra.run.dir= for a new run, a copy of the run for resume=) and run the command again")
    if code == errno.EROFS:
        return f"{where}: read-only file system; use a writable location (out_root=..., hydra.run.dir=...)"
    if code in (errno.EACCES, errno.EPERM):
        return f"{where}: permission denied; use a folder you can write to (out_root=..., hydra.run.dir=...)"
    if code == errno.ENOTDIR:
        return f"{where}: a part of this path is a file, not a folder; choose another path"
    if code == errno.EEXIST:
        return f"{where}: exists and is not a folder; choose another path"
    if code == errno.ENAMETOOLONG:
        return (f"{where}: file name too long; shorten the path (fewer overrides in the name, or hydra.run.dir=...; "
                f"in a sweep hydra.sweep.subdir=...)")
    return f"{where}: {err.strerror or one_line(err)}"


# Exception types (by module and name, so this module stays torch- and yaml-free) that mean a file
# could not be parsed: a damaged or foreign file, not a bug.
_CORRUPT_FILE_TYPES = {("_pickle", "UnpicklingError"), ("pickle", "UnpicklingError"), ("zipfile", "BadZipFile"),
                       ("json.decoder", "JSONDecodeError"), ("yaml.scanner", "ScannerError"),
                       ("yaml.parser", "ParserError"), ("yaml.constructor", "ConstructorError"),
                       ("yaml.reader", "ReaderError"), ("yaml.composer", "ComposerError")}


def is_corrupt_file(err: BaseException) -> bool:
    return ((type(err).__module__, type(err).__name__) in _CORRUPT_FILE_TYPES or isinstance(err, EOFError)
            or (isinstance(err, RuntimeError) and ("PytorchStreamReader" in str(err)
                                                   or "Error(s) in loading state_dict" in str(err))))


def fault_line(err: BaseException, memory_lower: str = "k, eval.k or eval.chunk",
               near: Optional[Path] = None) -> Tuple[str, int]:
    """(one line, exit status) for any exception reaching a command's error boundary; `near`:
    the command's directory, named when an OSError names no file."""
    if isinstance(err, (VaexpError, Interrupted)):
        return str(err), err.exit_code
    if isinstance(err, KeyboardInterrupt):
        return ("stopped by SIGTERM" if isinstance(err, Terminated) else "interrupted"), 130
    if is_out_of_memory(err):
        return f"out of memory ({allocation_detail(err)}); lower {memory_lower}", 2
    if isinstance(err, OSError):
        return os_error_line(err, near), 2
    if is_corrupt_file(err):
        return f"a damaged or foreign file could not be read ({one_line(err)}); VAEXP_DEBUG=1 shows where", 2
    return f"unexpected error: {one_line(err)} (a bug in vaexp? VAEXP_DEBUG=1 shows the traceback)", 1
