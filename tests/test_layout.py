"""The package's shape: layers that only import downward, no import cycles, function-local
imports only where they keep start-up torch-free, and one list of each thing (the registries
agree with conf/, the key classes with train.yaml)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "vaexp"
CONF = ROOT / "conf"

# Lowest first. A module may import modules of its own layer or of a lower one, never higher.
LAYERS = [
    ("floor", ["vaexp", "vaexp.errors", "vaexp.schema", "vaexp.schedule", "vaexp.runtime", "vaexp.stats"]),
    ("run directory", ["vaexp.rundir"]),
    ("maths, models, data, logging", ["vaexp.objectives", "vaexp.estimators", "vaexp.gradstats", "vaexp.models",
                                      "vaexp.data", "vaexp.tblog"]),
    ("evaluation", ["vaexp.surgery", "vaexp.evaluate"]),
    ("training", ["vaexp.training"]),
    ("libraries on top", ["vaexp.snr", "vaexp.report"]),
    ("command line", ["vaexp.cli", "vaexp.__main__"]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES: Dict[str, Path] = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    if rank is None:
        raise AssertionError(f"{module} has no layer: add it to LAYERS in tests/test_layout.py")
    return rank


def imports(path: Path) -> List[Tuple[str, bool, int]]:
    """(imported vaexp module, inside a function?, line) for every import in the file. `from
    vaexp.x import y` counts as vaexp.x.y when y is a module, else as vaexp.x."""
    tree = ast.parse(path.read_text())
    local_lines: Set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local_lines |= {n.lineno for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno in local_lines, node.lineno) for a in node.names if a.name.startswith("vaexp")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vaexp"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.append((sub if sub in MODULES else node.module, node.lineno in local_lines, node.lineno))
    return out


def top_level_torch(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    for node in tree.body:  # module level only (not in functions, not under `if TYPE_CHECKING`)
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "torch" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "torch":
            return True
    return False


GRAPH: Dict[str, Set[str]] = {m: {t for t, local, _ in imports(p) if not local} for m, p in MODULES.items()}


def loads_torch(module: str, seen=None) -> bool:
    """Whether importing `module` imports torch (through its own module-level imports)."""
    seen = set() if seen is None else seen
    if module in seen:
        return False
    seen.add(module)
    parent = module.rsplit(".", 1)[0] if "." in module else None
    return (top_level_torch(MODULES[module]) or any(loads_torch(t, seen) for t in GRAPH[module] if t in MODULES)
            or (parent is not None and parent in MODULES and loads_torch(parent, seen)))


def test_every_module_has_a_layer_and_imports_only_downward():
    upward = []
    for module, path in MODULES.items():
        mine = layer_of(module)
        for target, local, line in imports(path):
            if target in MODULES and layer_of(target) > mine:
                upward.append(f"{path.relative_to(ROOT)}:{line} ({LAYERS[mine][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_import_cycles():
    """Function-local imports included: a cycle hidden inside a function is still a cycle."""
    graph = {m: {t for t, _, _ in imports(p) if t in MODULES and t != m} for m, p in MODULES.items()}
    state: Dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: List[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_function_local_imports_only_keep_start_up_torch_free():
    """A function-local import is allowed only where the importing module is torch-free and the
    imported one is not: then it keeps `vaexp --help` / `vaexp report` from loading torch."""
    unjustified = []
    for module, path in MODULES.items():
        for target, local, line in imports(path):
            if local and not (not loads_torch(module) and target in MODULES and loads_torch(target)):
                unjustified.append(f"{path.relative_to(ROOT)}:{line} imports {target} inside a function")
    assert not unjustified, "\n".join(unjustified)


def test_the_cli_and_report_start_without_torch():
    code = ("import sys, vaexp.cli, vaexp.cli.callback, vaexp.report, vaexp.rundir, vaexp.schema; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


# --------------------------------------------------------------------------- one list of each thing

def options(group: str) -> Dict[str, str]:
    """conf/<group>/*.yaml: file stem -> its `name:`."""
    return {p.stem: yaml.safe_load(p.read_text()).get("name") for p in sorted((CONF / group).glob("*.yaml"))}


@pytest.mark.parametrize("group", ["objective", "estimator", "dataset", "model"])
def test_every_config_option_is_in_its_registry_and_back(group):
    from vaexp.data import DATASETS
    from vaexp.estimators import ESTIMATORS
    from vaexp.models import MODELS
    from vaexp.objectives import OBJECTIVES

    registry = {"objective": OBJECTIVES, "estimator": ESTIMATORS, "dataset": DATASETS, "model": MODELS}[group]
    found = options(group)
    assert all(stem == name for stem, name in found.items()), f"conf/{group}: file names and name: keys differ"
    assert set(found) == set(registry), f"conf/{group}/*.yaml {sorted(found)} vs the registry {sorted(registry)}"


def test_every_dataset_option_names_its_own_schema_and_sets_only_its_keys():
    import dataclasses

    from vaexp.cli.configs import DATASET_SCHEMAS, dataset_options, dataset_schema
    from vaexp.data import DATASETS

    assert dataset_options() == sorted(DATASETS)
    used = set()
    for option in dataset_options():
        schema = dataset_schema(option)
        assert schema is not None, f"conf/dataset/{option}.yaml names no schema of DATASET_SCHEMAS"
        used.add(schema)
        body = yaml.safe_load((CONF / "dataset" / f"{option}.yaml").read_text())
        fields = {f.name for f in dataclasses.fields(schema)}
        assert set(body) - {"defaults"} <= fields, (option, set(body) - fields)
    assert used == set(DATASET_SCHEMAS.values()), "a schema no dataset uses"


def test_exclude_keys_are_the_runtime_only_keys():
    from vaexp import rundir

    train = yaml.safe_load((CONF / "train.yaml").read_text())
    exclude = train["hydra"]["job"]["config"]["override_dirname"]["exclude_keys"]
    # `experiment` is a preset's name (a defaults-list choice), not a config key.
    assert sorted(exclude) == sorted(rundir.RUNTIME_ONLY + ("experiment",))


def _schema_defaults(cls) -> Dict:
    import dataclasses
    from enum import Enum

    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        if dataclasses.is_dataclass(value):
            value = _schema_defaults(type(value))
        out[f.name] = value.value if isinstance(value, Enum) else value
    return out


def _command_configs():
    from vaexp.cli.commands import COMMANDS

    return [(f"{c.config_name}.yaml", c.schema.__name__) for c in COMMANDS.values()]


@pytest.mark.parametrize("path,schema", _command_configs() + [("eval/default.yaml", "EvalConf")])
def test_the_yaml_defaults_are_the_schemas(path, schema):
    """A command's yaml repeats its schema's defaults (as documentation, next to the comments): one
    that drifted would make `vaexp train` and the library (vaexp.schema) disagree. Its defaults list
    names the schema that vaexp.cli.configs stores for it."""
    from vaexp import schema as schemas

    if path != "eval/default.yaml":
        assert f"{path[:-5]}_schema" in yaml.safe_load((CONF / path).read_text())["defaults"], path
    defaults = _schema_defaults(getattr(schemas, schema))
    given = {k: v for k, v in (yaml.safe_load((CONF / path).read_text()) or {}).items()
             if k not in ("defaults", "hydra")}

    def check(yaml_part: Dict, schema_part: Dict, where: str):
        for key, value in yaml_part.items():
            assert key in schema_part, f"{path}: {where}{key} is not in {schema}"
            if isinstance(value, dict) and isinstance(schema_part[key], dict):
                check(value, schema_part[key], f"{where}{key}.")
            elif schema_part[key] != "???":  # MISSING: the group option sets it
                assert value == schema_part[key], f"{path}: {where}{key}: {value!r}, {schema} says {schema_part[key]!r}"

    check(given, defaults, "")


def test_key_classes_are_nested_consistently():
    from vaexp import rundir

    assert all(rundir.covers(rundir.RESUMABLE, k) for k in rundir.RUNTIME_ONLY)
    assert all(rundir.covers(rundir.NOT_A_SETTING, k) for k in rundir.RUNTIME_ONLY)
    # A stack shares one loop: device, log_every and fast must agree, the rest of the runtime keys may not.
    assert not any(rundir.covers(rundir.STACK_PER_RUN, k) for k in ("device", "log_every", "fast"))
    assert rundir.covers(rundir.RESUMABLE, "eval.k") and not rundir.covers(rundir.RESUMABLE, "evaluation")


def test_pyproject_ships_every_package():
    """setuptools' explicit package list: a subpackage missing there is missing from the wheel."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        pytest.skip("tomllib needs Python 3.11")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {module_name(p.parent / "__init__.py") for p in PKG.rglob("__init__.py")}
    conf = {"vaexp.conf" + module_name(p.parent / "__init__.py")[len("conf"):] for p in CONF.rglob("__init__.py")}
    assert packages | conf == listed


def test_the_wheel_ships_the_published_numbers():
    """Package data outside conf/: the published numbers the report reads."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        pytest.skip("tomllib needs Python 3.11")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "published/*.yaml" in data["vaexp.report"] and list((PKG / "report" / "published").glob("*.yaml"))
