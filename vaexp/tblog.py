"""TensorBoard output of a run: scalars, image grids, text cards, and the HPARAMS table.

Invariants: the HPARAMS table's metric values are the last ``hparam/*`` scalars of each run, so
every evaluation (training's and each later ``vaexp eval``) writes them again at the checkpoint's
step, after the earlier ones: the table shows the latest. TensorBoard shows the first five hparam
columns (those flagged as differing first) and the first five metric columns by default, so the
experiment summary flags the keys the runs are compared on and lists the main metrics first.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from torch import Tensor

from vaexp import rundir
from vaexp.rundir import quantity_key


def image_grid(images: Tensor, shape, cols: Optional[int] = None, pad: int = 1) -> Tensor:
    """[N, H*W] in [0,1] -> [1, rows*(H+pad)+pad, cols*(W+pad)+pad] for add_image (CHW)."""
    h, w = shape
    n = images.shape[0]
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = torch.ones(rows * (h + pad) + pad, cols * (w + pad) + pad)
    imgs = images.detach().float().cpu().reshape(n, h, w)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = imgs[i]
    return grid.unsqueeze(0)


class RunLogger:
    """A SummaryWriter in the run directory. `session`: this writer starts a training session at
    that step (a fresh run 0, a resume its checkpoint's step + 1): TensorBoard then hides what an
    earlier session logged from that step on, i.e. what a process killed after its checkpoint
    logged past it; the points at the checkpoint's own step were logged before it was written and
    stay. Commands that only add to a run (vaexp eval) start no session."""

    def __init__(self, run_dir: Path, session: Optional[int] = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir))
        if session is not None:
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog

            # A session START purges events at or past its step, except that TensorBoard's own
            # reader takes a directory's first START as its beginning; written twice, the second
            # purges in a directory whose runs wrote none (vaexp before 2026-12), and is a no-op
            # elsewhere (the legacy EventAccumulator, which vaexp report reads, purges at each).
            fw = self.writer._get_file_writer()
            for _ in range(2):
                fw.add_event(Event(step=int(session), session_log=SessionLog(status=SessionLog.START)))
            self.writer.flush()  # written now, not by the writer's thread after a rollback

    def scalars(self, values: Dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def images(self, tag: str, images: Tensor, shape, step: int, cols: Optional[int] = None) -> None:
        self.writer.add_image(tag, image_grid(images, shape, cols), step, dataformats="CHW")

    def text(self, tag: str, markdown: str, step: int) -> None:
        self.writer.add_text(tag, markdown, step)

    def metrics(self, metrics: Dict[str, float], step: int) -> None:
        """The HPARAMS table's metric values (hparam/*) for the evaluation at `step`."""
        self.scalars(metrics, step)

    def hparams(self, hparams: Dict[str, Any], differs: Iterable[str], metrics: Dict[str, float], step: int) -> None:
        """This run's row of the HPARAMS table, in its own event file (not a sub-run), so one
        TensorBoard over a sweep shows every run: the session (its settings), the experiment
        summary (columns: `differs` flagged so TensorBoard shows them first, metrics in the
        order given), and the metric values."""
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

        differs = set(differs)
        start = plugin_data_pb2.SessionStartInfo()
        infos = []
        for name, value in hparams.items():
            if value is None:
                continue
            if isinstance(value, bool):
                start.hparams[name].bool_value, kind = value, api_pb2.DATA_TYPE_BOOL
            elif isinstance(value, (int, float)):
                start.hparams[name].number_value, kind = value, api_pb2.DATA_TYPE_FLOAT64
            else:
                start.hparams[name].string_value, kind = str(value), api_pb2.DATA_TYPE_STRING
            infos.append(api_pb2.HParamInfo(name=name, type=kind, differs=name in differs))
        experiment = api_pb2.Experiment(hparam_infos=infos,
                                        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag))
                                                      for tag in metrics])
        end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS)
        fw = self.writer._get_file_writer()
        for tag, data in ((metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment)),
                          (metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=start)),
                          (metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end))):
            data.version = metadata.PLUGIN_DATA_VERSION
            meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME,
                                                                          content=data.SerializeToString()))
            fw.add_summary(Summary(value=[Summary.Value(tag=tag, metadata=meta)]), step)
        self.metrics(metrics, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def hparam_metrics(test: Dict, train: Optional[Dict] = None) -> Dict[str, float]:
    """The HPARAMS table's metric columns for one evaluation, in column order: test NLL, train
    bound, active units (all layers), and which evaluation it was (test images, K) - the five
    shown by default - then the L_k, the validation bound and the units per layer."""
    out = {"hparam/test_nll": test["nll"]}
    slug = quantity_key(train.get("quantity", "bound")) if train else "bound"  # jvi: jvi_estimate, never "bound"
    if train and train.get(slug) is not None:
        out[f"hparam/train_{slug}"] = train[slug]
    out["hparam/active_units"] = sum(test["active_units"])
    out["hparam/eval_n_test"] = test["n_test"]
    out["hparam/eval_k"] = test["k"]
    for key in rundir.lk_keys(test):
        if int(key[1:]) != test["k"]:  # L_K is the test NLL's own estimate
            out[f"hparam/{key}"] = test[key]
    if train and train.get(f"valid_{slug}") is not None:
        out[f"hparam/valid_{slug}"] = train[f"valid_{slug}"]
    if len(test["active_units"]) > 1:
        out.update({f"hparam/active_units_{i + 1}": a for i, a in enumerate(test["active_units"])})
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}


def eval_card(title: str, table: str) -> str:
    """An evaluation as a TEXT card: its title, and the printed table as a code block."""
    return f"**{title}**\n\n" + "\n".join("    " + line for line in table.splitlines())


# -- TensorBoard's HPARAMS table -------------------------------------------------------------------

# Its settings columns: name -> config key. A key the runs are compared on (varied_keys) that is
# not here becomes a column of its own, named by its key.
HPARAMS = {"dataset": "dataset.name", "model": "model.name", "objective": "objective.name",
           "estimator": "estimator.name", "m": "m", "k": "k", "beta": "beta", "seed": "seed",
           "schedule": "schedule.name", "lr": "schedule.lr", "batch_size": "batch_size"}
# Keys that are never settings columns: how a run executes, where its data were read from, and
# the evaluation (its test images and K are metric columns, as a later `vaexp eval` may change them).
_NOT_HPARAMS = rundir.RUNTIME_ONLY + ("experiment", "hydra") + rundir.DATA_SOURCE_KEYS + ("eval",)


def varied_keys(run_dir: Path) -> List[str]:
    """The config keys a run is compared on: for a sweep job, those its sweep varies (the sweeps
    on the command line and an experiment preset's hydra.sweeper.params, from the sweep's
    multirun.yaml); for a run of its own, those its command line set. [] when neither record
    exists (a run not started by the CLI)."""
    run_dir = Path(run_dir)
    parser = OverridesParser.create()
    keys: List[str] = []
    try:
        sweep_file = run_dir.parent / rundir.MULTIRUN_RECORD
        if sweep_file.is_file():
            sweep = OmegaConf.load(sweep_file)
            given = parser.parse_overrides([str(o) for o in sweep.hydra.overrides.task])
            fixed = {o.get_key_element().lstrip("+~") for o in given if not o.is_sweep_override()}
            params = OmegaConf.select(sweep, "hydra.sweeper.params") or {}
            keys = [key for key in params if key not in fixed]
            keys += [o.get_key_element().lstrip("+~") for o in given if o.is_sweep_override()]
            if "mk" in keys or ("m" in keys and sweep.get("mk") is not None):
                keys.append("k")  # k = mk/m varies with them
        elif (run_dir / rundir.OVERRIDES_RECORD).is_file():
            given = parser.parse_overrides([str(o) for o in OmegaConf.load(run_dir / rundir.OVERRIDES_RECORD)])
            keys = [o.get_key_element().lstrip("+~") for o in given]
    except Exception:  # noqa: BLE001 - a damaged record costs the table its highlighting, not the run
        return []
    return list(dict.fromkeys(k for k in keys if not rundir.covers(_NOT_HPARAMS, k) and not k.startswith("hydra/")))


def hparams(cfg, varied: Iterable[str] = ()) -> Tuple[Dict[str, Any], List[str]]:
    """The HPARAMS table's settings of a run, and which of them its runs are compared on
    (`varied`: config keys, e.g. from varied_keys): (name -> value, names)."""
    by_key = {key: name for name, key in HPARAMS.items()}
    values = {name: OmegaConf.select(cfg, key) for name, key in HPARAMS.items()}
    differs = []
    for key in varied:
        name = by_key.get(key) or by_key.get(f"{key}.name") or key
        if name not in values:
            value = OmegaConf.select(cfg, key)
            values[name] = str(OmegaConf.to_container(value)) if OmegaConf.is_config(value) else value
        differs.append(name)
    return values, list(dict.fromkeys(differs))
