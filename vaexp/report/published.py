"""Published numbers beside measured ones: one data file per preset (published/<preset>.yaml).

A file names its source and what its numbers are, the protocol every cell shares (dataset,
schedule, batch, evaluation, ...) and per cell the settings that identify it and the published
test NLL (with its spread over runs, when the paper gives one) and active units. Invariants: a
setting is compared with a cell only when it has every protocol and cell setting (its eval.k and
test images as its stored evaluation says), a named model or schedule with all its settings; the verdict "within" is |measured − published| <=
published spread + the measured standard error (over seeds when there are several, else the
K-sample estimate's own); nothing here is in code: the numbers live in the data files.
"""
from __future__ import annotations

import functools
import math
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml
from omegaconf import OmegaConf

from vaexp.report.runs import Group, fmt_num
from vaexp.rundir import flatten
from vaexp.schema import TrainConfig

DATA_DIR = Path(__file__).with_name("published")


@dataclass
class Cell:
    preset: str
    source: str
    what: str
    settings: Dict[str, Any]     # protocol + the cell's own settings (dotted config keys)
    nll: float
    spread: Optional[float]      # the published std over runs (None: not published)
    active_units: Optional[List[int]]


def load(data_dir: Path = DATA_DIR) -> List[Cell]:
    cells = []
    for path in sorted(Path(data_dir).glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        for cell in doc["cells"]:
            cells.append(Cell(path.stem, " ".join(str(doc["source"]).split()), " ".join(str(doc["what"]).split()),
                              {**doc.get("protocol", {}), **cell["match"]}, float(cell["nll"]),
                              None if cell.get("spread") is None else float(cell["spread"]),
                              cell.get("active_units")))
    return cells


def _same(value: Any, wanted: Any) -> bool:
    if isinstance(wanted, float) or isinstance(value, float):
        return value is not None and wanted is not None and math.isclose(float(value), float(wanted), rel_tol=1e-9)
    return value == wanted


# A cell's model.name / schedule.name means that option unchanged: a run is compared with it only
# with every setting of conf/<group>/<name>.yaml (on its schema), so a burda1 of other widths or a
# shortened burda schedule (schedule.stages=1) never sits next to the published number.
WHOLE_OPTIONS = ("model", "schedule")


@functools.lru_cache(maxsize=None)
def option_settings(group: str, name: str) -> Tuple[Tuple[str, Any], ...]:
    """The dotted settings that `<group>=<name>` composes (conf/<group>/<name>.yaml on the schema
    TrainConfig types the group with); () for an option vaexp does not have."""
    path = resources.files("vaexp.conf").joinpath(group, f"{name}.yaml")
    if not path.is_file():
        return ()
    doc = {k: v for k, v in (yaml.safe_load(path.read_text()) or {}).items() if k != "defaults"}
    schema = typing.get_type_hints(TrainConfig)[group]
    values = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(schema), doc), resolve=True)
    return tuple((f"{group}.{k}", tuple(v) if isinstance(v, list) else v) for k, v in flatten(values).items())


def matches(group: Group, cell: Cell) -> bool:
    flat = group.first.flat
    if not all(key in flat and _same(flat[key], value) for key, value in cell.settings.items()):
        return False
    # (a key the run's config lacks is from an older schema, which had only the default)
    return all(key not in flat or _same(flat[key], value)
               for g in WHOLE_OPTIONS if f"{g}.name" in cell.settings
               for key, value in option_settings(g, str(cell.settings[f"{g}.name"])))


@dataclass
class Comparison:
    group: Group
    cell: Cell
    measured: float
    se: Optional[float]          # standard error of `measured`
    se_kind: str                 # "over seeds" | "of the K-sample estimate"
    n: int

    @property
    def difference(self) -> float:
        return self.measured - self.cell.nll

    @property
    def within(self) -> Optional[bool]:
        if self.se is None:
            return None
        return abs(self.difference) <= (self.cell.spread or 0.0) + self.se


def compare(groups: Sequence[Group], cells: Optional[Sequence[Cell]] = None) -> List[Comparison]:
    out = []
    for g in groups:
        for cell in cells if cells is not None else load():
            if not matches(g, cell):
                continue
            mean, std, n = g.stats("test_nll")
            if mean is None:
                continue
            if n >= 2 and std is not None:
                se, kind = std / math.sqrt(n), "over seeds"
            else:
                stderr = g.first.test.get("nll_stderr")
                se, kind = (float(stderr), "of the K-sample estimate") if isinstance(stderr, (int, float)) else (None, "")
            out.append(Comparison(g, cell, mean, se, kind, n))
    return out


def _units(values: Optional[Sequence[float]]) -> str:
    return "–" if not values else "+".join(fmt_num(round(float(v), 1)) for v in values)


def markdown(rows: Sequence[Comparison]) -> str:
    if not rows:
        return ""
    lines = ["## Published numbers", "",
             "| setting | published NLL | measured NLL | difference | within? | published active units | "
             "measured active units | source |", "|---|--:|--:|--:|:-:|--:|--:|---|"]
    for r in rows:
        f = r.group.first.flat
        label = f"{f.get('model.name')} {f.get('objective.name')} m={f.get('m')} k={f.get('k')}" + \
            (f" β={fmt_num(f.get('beta'))}" if f.get("beta") is not None else "")
        pub = f"{r.cell.nll:.2f}" + (f" ± {r.cell.spread:.2f}" if r.cell.spread is not None else "")
        measured = f"{r.measured:.2f}" + (f" ± {r.se:.2f}" if r.se is not None else "") + f" (n={r.n})"
        within = {True: "yes", False: "no", None: "–"}[r.within]
        units = r.group.unit_stats()
        lines.append(f"| {label} | {pub} | {measured} | {r.difference:+.2f} | {within} | "
                     f"{_units(r.cell.active_units)} | {_units(units[0] if units else None)} | {r.cell.preset} |")
    lines += ["", "within?: |measured − published| ≤ the published spread (0 where the paper gives none) + the "
                  "measured standard error (over seeds when there are several, else that of the K-sample estimate). "
                  "Active units: per stochastic layer (mean over seeds)."]
    for preset, (source, what) in sorted({r.cell.preset: (r.cell.source, r.cell.what) for r in rows}.items()):
        lines.append(f"- `{preset}`: {source}. {what}")
    return "\n".join(lines) + "\n"


def columns(rows: Sequence[Comparison]) -> Dict[int, Dict[str, Any]]:
    """summary.csv's published columns, by id of the group."""
    return {id(r.group): {"published_nll": r.cell.nll, "published_spread": r.cell.spread,
                          "published_difference": r.difference, "published_within": r.within,
                          "published_source": r.cell.preset} for r in rows}
