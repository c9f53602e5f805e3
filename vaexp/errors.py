"""The exceptions the CLI turns into one line and an exit status (no traceback).

VaexpError: a problem with the user's input or environment; its message names the setting or
file and the fix; exit status 2. Interrupted: training stopped by a signal after checkpointing;
its message says how to continue; exit status 130.
"""
from pathlib import Path
from typing import Dict, Optional


class VaexpError(Exception):
    exit_code = 2


class Interrupted(Exception):
    exit_code = 130

    def __init__(self, run_dir: Path, state: Dict, message: Optional[str] = None):
        super().__init__(message or f"interrupted at epoch {state['epoch'] + 1}, step {state['step']}; "
                                    f"checkpoint saved in {run_dir}. Re-run with resume={run_dir} to continue")
        self.run_dir, self.state = run_dir, state
