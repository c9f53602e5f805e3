"""The runs a report is about: found under directories, judged, grouped into settings.

A run is a directory holding the config.yaml that `vaexp train` writes (found at any depth; hidden
folders skipped). Invariants: whether it is finished is vaexp.rundir.judge's verdict on its
metrics.json (never config.yaml alone); a finished run's eval settings are those its latest
evaluation stored; runs are grouped by every setting except vaexp.rundir.NOT_A_SETTING, so seeds
of one setting share a group; a copied run (same setting and seed) counts once.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import yaml
from omegaconf import OmegaConf

from vaexp.errors import VaexpError, one_line
from vaexp.rundir import (CHECKPOINT, CONFIG, DATA_SOURCE_KEYS, ERROR_FILE, HYDRA_DIR, METRICS, NOT_A_SETTING,
                          OVERRIDES_RECORD, WEIGHT_KEYS, configured_epochs, covers, flatten, judge, override_keys,
                          quantity_key, read_metrics)
from vaexp.schedule import epoch_learning_rates
from vaexp.schema import derived_k

# into settings and contexts without them (vaexp.rundir holds the list).
IGNORED = tuple(NOT_A_SETTING)
# What varies inside one plot: the lines, and the (M, K) axes.
LINE_KEYS = ("objective.name", "estimator.name", "beta")
GRID_KEYS = ("m", "k")
# Columns every table has (config keys); anything else that varies gets a column of its own.
# eval.k and eval.n_test (as evaluated) are not among them: when they differ, they get columns.
STANDARD_KEYS = ("dataset.name", "model.name", "objective.name", "estimator.name", "m", "k", "beta", "seed")
SURGERY = (("recon", "recon"), ("avg_kl", "avg KL"), ("mutual_info", "I(x;z)"),
           ("marginal_kl", "KL(q(z)‖p(z))"))
# A finished run's pseudo-setting in Run.flat: the data its evaluation scored (assign_data), shown
# as a column like any other setting when it varies. Not a config key.
DATA = "data"
# The dataset keys that do not change which test images a run scores (vaexp.report.compare's too).
NOT_THE_TEST_SET = DATA_SOURCE_KEYS + ("dataset.n_valid", "dataset.n_train", "dataset.shuffle_seed")


class ReportError(VaexpError):
    pass


@dataclass
class Run:
    path: Path
    name: str                      # as shown: relative to the directory it was found under
    config: Dict[str, Any]
    flat: Dict[str, Any]           # dotted keys, lists as tuples
    status: str                    # finished | unfinished | diverged | failed | duplicate
    test: Dict[str, Any] = field(default_factory=dict)
    train: Dict[str, Any] = field(default_factory=dict)
    detail: str = ""
    evaluation: Dict[str, Any] = field(default_factory=dict)  # the latest metrics.json "evals" entry
    hint: str = ""                 # an unfinished run: the command that finishes it
    curve: List[Dict[str, Any]] = field(default_factory=list)  # evaluations during training (eval.every)
    data: Optional[Tuple] = None  # a finished run's data identity (assign_data); None: not recorded

    @property
    def setting(self) -> Tuple:
        return _key(self.flat, IGNORED)

    @property
    def context(self) -> Tuple:
        return _key(self.flat, IGNORED + LINE_KEYS + GRID_KEYS)

    @property
    def training_context(self) -> Tuple:
        """context without the eval.* settings, which a training curve does not depend on (and
        which an unfinished run has only as configured: n_test=null, not the evaluated count), and
        without DATA, which only a finished run's evaluation records."""
        return _key(self.flat, IGNORED + LINE_KEYS + GRID_KEYS + ("eval", DATA))


# --------------------------------------------------------------------------- finding runs

def check_dirs(dirs: Sequence[str], command: str = "report") -> None:
    if not dirs:
        raise ReportError(f"vaexp {command} needs at least one directory: vaexp {command} outputs/multirun/<sweep> "
                          f"[more sweep or run directories]")
    for d in dirs:
        if not Path(str(d)).is_dir():
            raise ReportError(f"{d}: no such directory; pass sweep or run directories made by vaexp train, "
                              f"e.g. vaexp {command} outputs/multirun/<sweep>")


def _key(flat: Dict[str, Any], drop: Iterable[str]) -> Tuple:
    drop = tuple(drop)
    return tuple(sorted((k, repr(v)) for k, v in flat.items() if not covers(drop, k)))


def _is_run_config(cfg: Any) -> bool:
    """A `vaexp train` config (not, e.g., a `vaexp snr` one, whose k and m are lists)."""
    return (isinstance(cfg, dict)
            and all(isinstance(cfg.get(k), dict) for k in ("dataset", "model", "objective", "estimator", "schedule"))
            and isinstance(cfg.get("k"), int) and isinstance(cfg.get("m"), int))


def _load_yaml(path: Path) -> Any:
    with open(path) as f:
        return yaml.safe_load(f)


def _normalised_flat(cfg: Dict[str, Any]) -> Dict[str, Any]:
    flat = {k: tuple(v) if isinstance(v, list) else v for k, v in flatten(cfg).items()}
    if flat.get("objective.name") != "ciwae":
        flat["beta"] = None  # beta only weighs ciwae's VAE term: elsewhere it changes nothing
    return flat


def _checkpoint_state(run_dir: Path, cfg: Dict[str, Any]) -> str:
    path = run_dir / CHECKPOINT
    if not path.exists():
        return "no checkpoint yet"
    total = ""
    try:
        total = f"/{len(epoch_learning_rates(OmegaConf.create(cfg['schedule'])))}"
    except Exception:
        pass
    try:
        import torch  # only for unfinished runs: a report of finished runs never loads torch

        state = torch.load(path, map_location="cpu", weights_only=False)["state"]
        return f"checkpoint at epoch {state['epoch']}{total}, step {state['global_step']}"
    except Exception as e:  # a checkpoint being written or damaged must not stop the report
        return f"checkpoint unreadable ({type(e).__name__})"


def _run_name(here: Path, top_path: Path, several: bool) -> str:
    rel = here.relative_to(top_path)
    name = str(rel) if str(rel) != "." else here.name
    if several:
        name = f"{top_path.name}/{name}" if str(rel) != "." else here.name
    return name


def _error_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError as e:
        return f"failed (its {path.name} is unreadable: {one_line(e)})"
    return lines[0] if lines else "failed"


def _override_value(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return tuple(value) if isinstance(value, list) else value


# Config groups whose choice (`dataset=mnist`) is the option's name (config key <group>.name).
_NAMED_GROUPS = ("dataset", "model", "objective", "estimator", "schedule")


def _flat_from_overrides(overrides: Sequence[Any]) -> Dict[str, Any]:
    """A failed job's settings as far as its command line says (`dataset=mnist` -> dataset.name)."""
    flat: Dict[str, Any] = {}
    for item, key in zip(overrides, override_keys(overrides)):
        text = str(item)
        if "=" not in text or text.startswith("~"):
            continue
        key = f"{key}.name" if key in _NAMED_GROUPS else key
        flat[key] = _override_value(text.split("=", 1)[1])
    return flat


def _hydra_record(here: Path) -> Optional[Tuple[Dict[str, Any], Dict[str, Any], str]]:
    """(config, flat settings, what they come from) of a directory that Hydra started a `vaexp
    train` job in but that has no config.yaml (the job failed before writing it), from Hydra's
    record of the command: its composed config (.hydra/config.yaml, with k derived from mk as the
    run would have), else its overrides (.hydra/overrides.yaml). None: no record, or the record
    of another command (e.g. a `vaexp snr` job)."""
    hydra = here / HYDRA_DIR
    try:
        job = (_load_yaml(hydra / "hydra.yaml") or {}).get("hydra", {}).get("job", {})
        if job.get("config_name") not in (None, "train"):
            return None  # another command's job (e.g. vaexp snr -m)
    except Exception:  # no or a damaged hydra.yaml: the other records decide
        pass
    composed = hydra / CONFIG
    if composed.is_file():
        try:
            cfg = _load_yaml(composed)
        except Exception:
            cfg = None
        if isinstance(cfg, dict) and any(isinstance(cfg.get(k), list) for k in ("k", "m")):
            return None  # a `vaexp snr` job's (its k and m are lists)
        if _is_run_config(cfg):
            try:  # interpolations (a gaussian model's latents: ${dataset.dim})
                cfg = OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)
            except Exception:
                pass
            cfg = dict(cfg)
            if isinstance(cfg.get("mk"), int):
                cfg["k"] = derived_k(cfg["k"], cfg["mk"], cfg["m"])
            return cfg, _normalised_flat(cfg), f"{HYDRA_DIR}/{CONFIG}"
    try:
        overrides = _load_yaml(here / OVERRIDES_RECORD)
    except Exception:
        return None
    if not isinstance(overrides, list):
        return None
    return {}, _flat_from_overrides(overrides), OVERRIDES_RECORD


def find_runs(dirs: Sequence[str]) -> Tuple[List[Run], List[Tuple[Path, str]]]:
    """(runs, skipped) under the given directories; skipped: (dir, reason) of run directories
    that cannot be reported (unreadable config.yaml or metrics.json). A sweep job that failed
    before writing config.yaml (its error.txt and Hydra's record of it there) is a failed run.
    The finished runs carry their data identity (assign_data)."""
    runs: List[Run] = []
    skipped: List[Tuple[Path, str]] = []
    seen = set()
    for top in dirs:
        top_path = Path(str(top))
        for root, subdirs, files in os.walk(top_path):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            here = Path(root)
            if CONFIG not in files:
                if METRICS in files:
                    skipped.append((here, "metrics.json without config.yaml"))
                elif ERROR_FILE in files:
                    failed = _failed_before_config(here, top_path, len(dirs) > 1, seen)
                    if failed is not None:
                        runs.append(failed)
                continue
            try:
                cfg = _load_yaml(here / CONFIG)
            except Exception as e:
                skipped.append((here, f"unreadable config.yaml ({one_line(e)})"))
                subdirs[:] = []
                continue
            if not _is_run_config(cfg):
                continue  # some other tool's config.yaml: keep looking below
            subdirs[:] = []  # a run directory holds no runs
            real = here.resolve()
            if real in seen:
                continue
            seen.add(real)
            name = _run_name(here, top_path, len(dirs) > 1)
            run = Run(path=here, name=name, config=cfg, flat=_normalised_flat(cfg), status="unfinished")
            metrics, why = read_metrics(here) if METRICS in files else (None, None)
            if why is not None:
                skipped.append((here, f"unreadable metrics.json ({why})"))
                continue
            state, detail = judge(metrics, configured_epochs(cfg))
            if state == "finished":
                last = metrics["evals"][-1]
                run.status, run.test = "finished", {k: v for k, v in last.items() if k not in _EVAL_RECORD}
                run.evaluation = last
                run.train = metrics.get("train") if isinstance(metrics.get("train"), dict) else {}
                run.curve = [p for p in metrics.get("curve") or [] if isinstance(p, dict) and "epoch" in p]
                run.flat = _with_eval_settings(run.flat, last)
            elif ERROR_FILE in files and state != "diverged":  # a diverged sweep job writes error.txt too
                run.status = "failed"
                run.detail = _error_line(here / ERROR_FILE)
            else:
                run.status = state
                run.detail = detail if metrics is not None else ""
            if run.status != "finished":
                state = _checkpoint_state(here, cfg)
                run.detail = f"{run.detail}; {state}" if run.detail else state
                run.hint = _hint(run, metrics)
            runs.append(run)
    assign_data([r for r in runs if r.status == "finished"])
    return runs, skipped


def _failed_before_config(here: Path, top_path: Path, several: bool, seen: set) -> Optional[Run]:
    """A sweep job directory with error.txt but no config.yaml (the job failed before writing it:
    its data could not be loaded, an eval.n_test larger than the test set, ...) as a failed run,
    its settings from Hydra's record of the job; None when it is not a `vaexp train` job's."""
    record = _hydra_record(here)
    if record is None:
        return None
    real = here.resolve()
    if real in seen:
        return None
    seen.add(real)
    cfg, flat, source = record
    run = Run(path=here, name=_run_name(here, top_path, several), config=cfg, flat=flat, status="failed")
    run.detail = f"{_error_line(here / ERROR_FILE)}; {_checkpoint_state(here, cfg)} (it failed before writing " \
                 f"config.yaml: its settings are those of {source})"
    run.hint = _hint(run, None)
    return run


def _hint(run: Run, metrics: Optional[Dict[str, Any]]) -> str:
    """What to run to finish an unfinished run."""
    state = ((metrics or {}).get("run") or {}).get("state")
    if run.status == "diverged":
        return "lower schedule.lr and train it again (a new run)"
    if run.status == "failed":
        return "fix the error, then run its sweep's command again (same sweep=<name>)"
    if state == "trained":  # training complete, the evaluation missing or not of the last checkpoint
        return f"vaexp eval {run.path}"
    if (run.path / CHECKPOINT).exists():
        return f"vaexp train resume={run.path}"
    return "not started: run its command (or its sweep's) again"


# Keys of a metrics.json evaluation entry that are not metrics.
_EVAL_RECORD = ("time", "settings", "checkpoint", "by", "per_example")


def _with_eval_settings(flat: Dict[str, Any], entry: Dict[str, Any]) -> Dict[str, Any]:
    """The run's settings with eval.* replaced by those its evaluation used (k and n_test as
    evaluated: n_test=null and the test set's size are the same evaluation)."""
    out = {k: v for k, v in flat.items() if not k.startswith("eval.")}
    settings = entry.get("settings") if isinstance(entry.get("settings"), dict) else {}
    for key, value in settings.items():
        out[f"eval.{key}"] = tuple(value) if isinstance(value, list) else value
    out["eval.k"], out["eval.n_test"] = entry.get("k", out.get("eval.k")), entry.get("n_test", out.get("eval.n_test"))
    return out


# --------------------------------------------------------------------------- the data a run scored

def test_images(run: Run) -> Optional[str]:
    """The sha256 of the test images the latest evaluation scored (None: evaluated before vaexp
    recorded it). Runs whose digests differ scored other images, whatever their settings say
    (another copy of the data, e.g. a dataset.path)."""
    value = run.test.get("test_images")
    return value if isinstance(value, str) and value else None


def training_data(run: Run) -> Optional[str]:
    """The sha256 of the training and validation data the run trained on, as metrics.json's
    train.training_data records it (None: trained before vaexp recorded it)."""
    value = run.train.get("training_data") if isinstance(run.train, dict) else None
    return value if isinstance(value, str) and value else None


_CACHED = re.compile(r"cache .+? \(from (.+)\)")


def data_source(run: Run) -> Optional[str]:
    """Where the run's data were read from, as metrics.json's train.data_source records it, with a
    cache read as the source it was filled from ("cache <file> (from X)" is X: the cache holds X's
    pixels); None when not recorded."""
    value = run.train.get("data_source") if isinstance(run.train, dict) else None
    if not isinstance(value, str) or not value.strip():
        return None
    match = _CACHED.fullmatch(value.strip())
    while match and match.group(1) != "an earlier run":  # a cache that does not know its origin stays itself
        value = match.group(1)
        match = _CACHED.fullmatch(value)
    return value.strip()


def test_set_settings(run: Run) -> Tuple:
    """The settings that fix which test images an evaluation scores: the dataset settings other
    than NOT_THE_TEST_SET, and the number of test images evaluated."""
    keys = {k: v for k, v in run.flat.items() if k.startswith("dataset.") and not covers(NOT_THE_TEST_SET, k)}
    keys["eval.n_test"] = run.flat.get("eval.n_test")
    return tuple(sorted((k, repr(v)) for k, v in keys.items()))


def assign_data(finished: Sequence[Run]) -> None:
    """Give each finished run its data identity (Run.data: (kind, test images, training data)) and
    its DATA label (Run.flat), which the grouping, the duplicates, the columns and
    vaexp.report.compare's pairing all read.

    The test images: a run whose evaluation recorded the sha256 of its test images is identified
    by it (runs with other digests scored other images). A run evaluated before vaexp recorded the
    digest is identified by the data source its training recorded (a cache read as what filled
    it): when runs that did record a digest read the same source under the same test-set
    settings and all scored one set of images, it is that set; otherwise it is the source itself
    (so runs of other recorded sources are told apart). A run that recorded neither is taken to
    be on the data of the other runs of its setting when they are all on one; otherwise its data
    are unknown (None, "not recorded"), which vaexp.report.compare pairs on the settings alone
    (same_data), as it pairs runs whose digest is missing.

    The training data, the same way: the sha256 its training recorded, else (trained before vaexp
    recorded it) that of the runs on its test images when they all trained on one, else None
    (not recorded: told apart from the recorded ones, paired with any)."""
    ident: Dict[int, Optional[Tuple[str, str]]] = {}
    by_source: Dict[Tuple, set] = {}
    for r in finished:
        digest, source = test_images(r), data_source(r)
        ident[id(r)] = ("sha256", digest) if digest else None
        if digest and source:
            by_source.setdefault((test_set_settings(r), source), set()).add(digest)
    for r in finished:
        source = data_source(r)
        if ident[id(r)] is None and source:
            digests = by_source.get((test_set_settings(r), source), set())
            ident[id(r)] = ("sha256", next(iter(digests))) if len(digests) == 1 else ("source", source)
    by_setting: Dict[Tuple, set] = {}
    for r in finished:
        by_setting.setdefault(_key(r.flat, IGNORED + (DATA,)), set()).add(ident[id(r)])
    for r in finished:
        if ident[id(r)] is None:
            known = by_setting[_key(r.flat, IGNORED + (DATA,))] - {None}
            if len(known) == 1:
                ident[id(r)] = next(iter(known))
    trained = {id(r): training_data(r) for r in finished}
    by_test: Dict[Any, set] = {}
    for r in finished:
        by_test.setdefault(ident[id(r)], set()).add(trained[id(r)])
    for r in finished:
        known = by_test[ident[id(r)]] - {None}
        if trained[id(r)] is None and len(known) == 1:
            trained[id(r)] = next(iter(known))
    full = {id(r): None if ident[id(r)] is None else (*ident[id(r)], trained[id(r)]) for r in finished}
    labels = _data_labels(finished, full)
    for r in finished:
        r.data = full[id(r)]
        r.flat = {**r.flat, DATA: labels[r.data]}


def _data_labels(runs: Sequence[Run], ident: Dict[int, Optional[Tuple[str, str, Optional[str]]]]) -> Dict[Any, str]:
    """Each identity's label: the test digest's first hex digits (at least 12, more where two
    digests of the report would look alike) with the data source when its runs agree on one; the
    source of a run without a digest; "not recorded"; and the training data's digest where runs on
    the same test images trained on other data."""
    digests = sorted({i[1] for i in ident.values() if i and i[0] == "sha256"}
                     | {i[2] for i in ident.values() if i and i[2]})
    n = 12
    while len({d[:n] for d in digests}) < len(digests):
        n += 4
    trainings: Dict[Tuple[str, str], set] = {}
    for identity in ident.values():
        if identity is not None:
            trainings.setdefault(identity[:2], set()).add(identity[2])
    labels: Dict[Any, str] = {None: "not recorded"}
    for identity in {i for i in ident.values() if i is not None}:
        kind, value, training = identity
        if kind == "sha256":
            sources = {data_source(r) for r in runs if ident[id(r)] == identity} - {None}
            label = f"test images sha256:{value[:n]}" + (f" ({sources.pop()})" if len(sources) == 1 else "")
        else:
            label = f"{value} (test images not recorded)"
        if len(trainings[identity[:2]]) > 1:
            label += f", training data sha256:{training[:n]}" if training else ", training data not recorded"
        labels[identity] = label
    return labels


def same_data(a: Optional[Tuple], b: Optional[Tuple]) -> bool:
    """Whether two data identities (Run.data) may be the same data: equal where both are recorded
    (the test images, then the training data), the rest not recorded."""
    if a is None or b is None:
        return True
    return a[:2] == b[:2] and (a[2] is None or b[2] is None or a[2] == b[2])


def split_duplicates(runs: Sequence[Run]) -> Tuple[List[Run], List[Tuple[Run, Run]]]:
    """(runs counted, [(duplicate, the run it repeats)]): finished runs of one setting, data (DATA,
    part of the setting) and seed (e.g. a copied run directory) count once."""
    first: Dict[Tuple, Run] = {}
    kept, duplicates = [], []
    for r in sorted(runs, key=lambda r: (str(r.path), r.name)):
        key = (r.setting, repr(r.flat.get("seed")))
        if key in first:
            duplicates.append((r, first[key]))
        else:
            first[key] = r
            kept.append(r)
    return kept, duplicates


# --------------------------------------------------------------------------- rows and groups

def _num(x: Any) -> Optional[float]:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def _units(values: Any) -> Optional[Tuple[float, ...]]:
    if isinstance(values, (list, tuple)) and values and all(_num(v) is not None for v in values):
        return tuple(float(v) for v in values)
    return None


def metric_values(run: Run) -> Dict[str, Any]:
    """The numbers of a finished run, by CSV column name."""
    t, tr = run.test, run.train
    out: Dict[str, Any] = {"test_nll": _num(t.get("nll")), "test_nll_stderr": _num(t.get("nll_stderr"))}
    eval_k = t.get("k")
    for key, value in t.items():
        if key.startswith("L") and key[1:].isdigit() and str(eval_k) != key[1:]:
            out[key] = _num(value)
    if t.get("L64") is not None and t.get("nll") is not None and eval_k != 64:
        # Rainforth et al.'s −KL(Q‖P) column: the IWAE-64 bound minus log p̂ (both from the same samples).
        out["neg_kl_qp"] = _num(t["L64"] + t["nll"])
    for key in WEIGHT_KEYS:  # importance-weight diagnostics of the K-sample estimate
        if key in t:
            out[key] = _num(t[key])
    out["active_units"] = _units(t.get("active_units"))
    for key, _ in SURGERY:
        if key in t:
            out[key] = _num(t.get(key))
    q = quantity_key(tr.get("quantity", "bound"))  # "bound", or "jvi_estimate": jvi's is not a bound
    out[f"train_{q}"] = _num(tr.get(q))
    out[f"valid_{q}"] = _num(tr.get(f"valid_{q}"))
    out["epochs"] = _num(tr.get("epochs"))
    out["wall_time_s"] = _num(tr.get("wall_time_s"))
    return out


def fmt_list(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ";".join(fmt_num(x) for x in v)
    return "" if v is None else str(v)


def fmt_num(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v.is_integer() and abs(v) < 1e15:
            return str(int(v))
        return repr(v)
    return str(v)


@dataclass
class Group:
    runs: List[Run]

    @property
    def first(self) -> Run:
        return self.runs[0]

    def stats(self, key: str) -> Tuple[Optional[float], Optional[float], int]:
        """(mean, sample std or None, n) of a scalar metric over the group's runs."""
        values = [metric_values(r).get(key) for r in self.runs]
        values = [v for v in values if v is not None and not math.isnan(v)]
        if not values:
            return None, None, 0
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
        return mean, std, len(values)

    def unit_stats(self) -> Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]:
        """Mean active units per layer, and the latent sizes."""
        au = [metric_values(r)["active_units"] for r in self.runs]
        au = [a for a in au if a is not None]
        if not au or len({len(a) for a in au}) != 1:
            return None
        mean = tuple(sum(a[i] for a in au) / len(au) for i in range(len(au[0])))
        units = _units(self.first.test.get("latent_units")) or tuple(float("nan") for _ in mean)
        return mean, units


def group_runs(runs: Sequence[Run]) -> List[Group]:
    groups: Dict[Tuple, List[Run]] = {}
    for r in runs:
        groups.setdefault(r.setting, []).append(r)
    return [Group(sorted(rs, key=lambda r: (str(r.flat.get("seed")), r.name))) for rs in groups.values()]


def sort_key(run: Run) -> Tuple:
    f = run.flat
    return (repr(run.context), str(f.get("dataset.name")), str(f.get("model.name")), str(f.get("objective.name")),
            str(f.get("estimator.name")), f.get("beta") or 0.0, f.get("m") or 0, f.get("k") or 0)


def varying_keys(runs: Sequence[Run], exclude: Iterable[str]) -> List[str]:
    """Config keys whose values differ between the runs (other than those excluded)."""
    exclude = tuple(exclude)
    keys = sorted(k for k in {k for r in runs for k in r.flat} if not covers(exclude, k))
    out = []
    for key in keys:
        values = {repr(r.flat.get(key)) for r in runs}
        if len(values) > 1:
            out.append(key)
    return out


