"""`vaexp -sc ...`: Hydra's bash completion, which calls the program without the command word.

Invariant: the first word completes to a command; after it, Hydra completes that command's
own config (COMP_LINE is rewritten without the command word before Hydra reads it).
"""
from __future__ import annotations

import os
import sys
from typing import List

from vaexp.cli.commands import COMMANDS, hydra_entry


def complete(argv: List[str]) -> None:
    flag = argv.index("-sc") if "-sc" in argv else argv.index("--shell-completion")
    value = argv[flag + 1] if flag + 1 < len(argv) else ""
    command = COMMANDS["train"]
    if value.startswith("query"):
        line = os.environ.get("COMP_LINE", "")
        words = line.split()
        if len(words) < 2 or (len(words) == 2 and not line.endswith(" ")):
            prefix = words[1] if len(words) == 2 else ""
            print(" ".join(c for c in COMMANDS if c.startswith(prefix)))
            return
        if words[1] not in COMMANDS:
            return
        command = COMMANDS[words[1]]
        os.environ["COMP_LINE"] = " ".join([words[0]] + words[2:]) + (" " if line.endswith(" ") else "")
    sys.argv = [sys.argv[0], "-sc", value]
    hydra_entry(command)()
