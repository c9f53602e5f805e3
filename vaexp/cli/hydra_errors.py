"""Hydra's and OmegaConf's config errors as one vaexp line with exit status 2.

An unknown setting, a value of the wrong type, an unknown config option or an override Hydra cannot
parse is the user's to fix: one line naming the override and the fix (the settings or options
there are, the closest one), exit status 2. Hydra itself prints 5-10 lines, suggests `+key=value`
(which vaexp refuses: nothing reads an added key) and exits 1, the status vaexp keeps for its own
bugs. Anything else is vaexp.errors.fault_line's.
"""
from __future__ import annotations

import difflib
import re
import sys
from typing import Any, Callable, List, Optional

from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from vaexp.errors import debugging, fault_line

_CONVERT = re.compile(r"Value '(?P<value>.*)' of type '\w+' could not be converted to (?P<kind>\w+)")
_NOISE = ("full_key:", "object_type=", "reference_type=", "Set the environment variable", "Config search path",
          "provider=", "See https://hydra.cc")


def _first_lines(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines()]
    return "; ".join(ln for ln in lines if ln and not ln.startswith(_NOISE))


def _override_of(err: BaseException, key: str) -> str:
    """The override as the user typed it (Hydra's message quotes it), else `key=...`."""
    text = str(err)
    found = re.search(r"use \+(\S+)", text) or re.search(r"override (\S+=\S*)", text)
    return found.group(1) if found else f"{key}=..."


def _settings(node: Any) -> List[str]:
    try:
        return [str(k) for k in node.keys() if str(k) != "hydra"]
    except Exception:  # noqa: BLE001 - not a mapping: no list to offer
        return []


_MULTIPLE = re.compile(r"Multiple values for (?P<group>[\w/.]+)\. To override a value use 'override [\w/.]+: "
                       r"(?P<option>[^']*)'")


def config_error_line(err: BaseException, command: str) -> Optional[str]:
    """One line for a config error of `vaexp <command>`, or None when `err` is not one. Only what
    Hydra raises counts (composing wraps OmegaConf's errors): an OmegaConf error of vaexp's own code
    (a key it reads and the config lacks) is a bug, for fault_line."""
    if not isinstance(err, HydraException):
        return None
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and getattr(cause, "full_key", None):
        key = str(cause.full_key)
        parent, _, leaf = key.rpartition(".")
        known = _settings(getattr(cause, "parent_node", None))
        near = difflib.get_close_matches(leaf, known, n=1)
        where = f"{parent}'s settings" if parent else "its settings"
        shown = "hydra" if key.split(".")[0] == "hydra" else "job"  # --cfg job has no hydra node
        listing = f"; {where}: {', '.join(known)}" if known and len(known) <= 16 else \
            f"; `vaexp {command} --cfg {shown}` lists {where}"
        hint = f"; did you mean {parent + '.' if parent else ''}{near[0]}?" if near else ""
        return f"{_override_of(err, key)}: vaexp {command} has no setting {key}{hint}{listing}"
    if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
        key = str(cause.full_key)
        msg = str(getattr(cause, "msg", cause))
        m = _CONVERT.search(msg)
        what = (f"{key} takes {'an' if m['kind'][0] in 'AEIOU' else 'a'} {m['kind'].lower()}, not {m['value']!r}"
                if m else _first_lines(msg))
        return f"{_override_of(err, key)}: {what}"
    if isinstance(err, MissingConfigException) and getattr(err, "options", None) is not None:
        missing = str(err.missing_cfg_file or "")
        group, _, option = missing.rpartition("/")
        near = difflib.get_close_matches(option, err.options, n=1)
        hint = f"; did you mean {group}={near[0]}?" if near else ""
        return (f"{group}={option}: {group} has no option {option} (no config {missing}){hint}; "
                f"the options: {', '.join(err.options)}")
    added = _MULTIPLE.match(_first_lines(str(err)))
    if added:  # +group=x for a group the defaults list already has: Hydra's advice is its yaml syntax
        group, option = added["group"], added["option"]
        return (f"+{group}={option}: {group} is a config group vaexp {command} already has; choose the option "
                f"without the +: {group}={option}")
    if isinstance(err, OverrideParseException):
        return (f"{err.override}: Hydra cannot parse this override ({_first_lines(err.message)}); see "
                f"https://hydra.cc/docs/advanced/override_grammar/basic/ (quote values with spaces or brackets)")
    return _first_lines(str(err)) + (f" ({_first_lines(str(err.__cause__))})" if err.__cause__ else "")


def exit_with_line(err: BaseException, command: str) -> None:
    """Print the one line for `err` and exit: 2 for a config error, else fault_line's status."""
    line = config_error_line(err, command)
    code = 2
    if line is None:
        line, code = fault_line(err)
    print(f"vaexp: {line}", file=sys.stderr, flush=True)
    sys.exit(code)


def route_hydra_errors(command: str) -> Callable[[], None]:
    """Make Hydra report the errors it catches (composing the config, launching) through
    :func:`exit_with_line`; returns the undo. Hydra catches them in
    hydra._internal.utils.run_and_report, a private function: were it renamed, Hydra's own report
    (several lines, exit 1) would come back, nothing worse. With VAEXP_DEBUG=1 or
    HYDRA_FULL_ERROR=1 the exception goes on, with its traceback."""
    import hydra._internal.hydra as hydra_mod
    import hydra._internal.utils as utils

    original = getattr(utils, "run_and_report", None)
    if original is None:
        return lambda: None

    def run_and_report(func: Callable[[], Any]) -> Any:
        try:
            return func()
        except Exception as err:  # noqa: BLE001 - Hydra's own boundary, which exits too
            if debugging():
                raise  # the traceback, as VAEXP_DEBUG=1 / HYDRA_FULL_ERROR=1 promise
            exit_with_line(err, command)

    modules = [m for m in (utils, hydra_mod) if getattr(m, "run_and_report", None) is original]
    for m in modules:
        m.run_and_report = run_and_report

    def undo() -> None:
        for m in modules:
            m.run_and_report = original

    return undo
