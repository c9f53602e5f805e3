"""`vaexp -sc ...`: Hydra's bash completion, which calls the program without the command word.

Invariants: the first word completes to a command; after it, Hydra completes that command's
own config (COMP_LINE is rewritten without the command word before Hydra reads it), and only
the config groups that command composes are offered: Hydra lists every group of the config
directory, which all commands share (`vaexp report <TAB>` would offer train's `objective=`).
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import Iterable, List, Set

from vaexp.cli.argv import named
from vaexp.cli.commands import COMMANDS, hydra_entry
from vaexp.cli.configs import config_groups, groups_of


def own_candidates(candidates: Iterable[str], config_name: str) -> List[str]:
    """Hydra's candidates less the config-group choices (`group=`, `group=option`, `group/...`)
    of groups that conf/<config_name>.yaml does not compose."""
    foreign: Set[str] = set(config_groups()) - set(groups_of(config_name))

    def group(candidate: str) -> str:
        return candidate.lstrip("+~").split("=", 1)[0].split("/", 1)[0]

    return [c for c in candidates if not ("=" in c or "/" in c) or "." in c.split("=", 1)[0] or group(c) not in foreign]


def complete(argv: List[str]) -> None:
    flag = argv.index("-sc") if "-sc" in argv else argv.index("--shell-completion")
    value = argv[flag + 1] if flag + 1 < len(argv) else ""
    command = COMMANDS["train"]
    sys.argv = [sys.argv[0], "-sc", value]
    if not value.startswith("query"):
        hydra_entry(command)()  # install= / uninstall=: Hydra's script
        return
    line = os.environ.get("COMP_LINE", "")
    words = line.split()
    if len(words) < 2 or (len(words) == 2 and not line.endswith(" ")):
        prefix = words[1] if len(words) == 2 else ""
        print(" ".join(c for c in COMMANDS if c.startswith(prefix)))
        return
    if words[1] not in COMMANDS:
        return
    command = COMMANDS[words[1]]
    done, current = (words[2:], "") if line.endswith(" ") else (words[2:-1], words[-1])
    if "/" in current and "=" not in current:
        return  # a directory being typed: no candidates, so bash completes the path
    os.environ["COMP_LINE"] = " ".join([words[0]] + named(words[1], command.positional, done) + [current])
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            hydra_entry(command)()
    except SystemExit:  # Hydra could not parse the line so far: nothing to offer
        return
    print(" ".join(own_candidates(out.getvalue().split(), command.config_name)))
