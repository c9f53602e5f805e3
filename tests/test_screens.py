"""What a new user sees: each dataset's own keys (and a foreign key refused with the list of the
right ones), tab completion per command, the progress bar and the resume messages, TensorBoard's
HPARAMS table and cards, and the README's lists of tags and files (issue 11)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from vaexp import rundir, tblog
from vaexp.training import loop

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def assert_no_traceback(res) -> None:
    assert "Traceback" not in res.err and "Traceback" not in res.out, res.err


def dataset_block(cfg_text: str) -> dict:
    return yaml.safe_load(cfg_text)["dataset"]


def readme_section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


# --------------------------------------------------------------------------- 3. each dataset, its own keys

@pytest.mark.parametrize("option,keys", [
    ("mnist", {"name", "n_valid", "path", "data_dir", "binarize_seed", "download"}),
    ("synthetic", {"name", "n_valid", "n_train", "n_test", "seed", "binarize_seed"}),
    ("gaussian", {"name", "n_valid", "dim", "n_train", "n_test", "seed"}),
    ("omniglot", {"name", "n_valid", "path", "data_dir", "binarize_seed", "download", "shuffle_seed"}),
    ("binarized_mnist", {"name", "n_valid", "path", "data_dir"}),
])
def test_cfg_job_shows_only_the_chosen_datasets_keys(option, keys, vaexp_main):
    res = vaexp_main("train", "--cfg", "job", f"dataset={option}", *(["model=gaussian"] if option == "gaussian" else []))
    assert res.code == 0, res.err
    assert set(dataset_block(res.out)) == keys


def test_the_default_mnist_config_has_no_synthetic_keys(vaexp_main):
    res = vaexp_main("train", "--cfg", "job")
    assert res.code == 0, res.err
    shown = dataset_block(res.out)
    assert shown["name"] == "mnist" and not {"n_train", "n_test", "seed", "dim", "shuffle_seed"} & set(shown)


MNIST_KEYS = "n_valid, path, data_dir, binarize_seed, download"
FOREIGN = [
    (["train", "dataset.n_train=100"], "dataset.n_train=100: dataset=mnist has no setting n_train", MNIST_KEYS,
     "dataset=gaussian, synthetic"),
    (["train", "dataset=synthetic", "dataset.path=/data"], "dataset=synthetic has no setting path",
     "n_valid, n_train, n_test, seed, binarize_seed", "dataset=binarized_mnist, fashion_mnist, mnist, omniglot"),
    (["train", "-m", "dataset=synthetic,mnist", "dataset.n_train=100"], "dataset=mnist has no setting n_train",
     MNIST_KEYS, "synthetic"),
    (["train", "-m", "experiment=iwae_table1", "dataset.seed=3"], "dataset=mnist has no setting seed", MNIST_KEYS,
     "synthetic"),
    (["train", "+dataset.dim=5"], "dataset=mnist has no setting dim", MNIST_KEYS, "dataset=gaussian"),
    (["train", "dataset.bogus=1"], "dataset=mnist has no setting bogus", MNIST_KEYS, None),
    (["snr", "dataset.path=/data"], "dataset=gaussian has no setting path", "n_valid, dim, n_train, n_test, seed",
     "mnist"),
]


@pytest.mark.parametrize("args,problem,listed,elsewhere", FOREIGN, ids=[" ".join(a) for a, *_ in FOREIGN])
def test_a_key_the_dataset_does_not_have_is_refused_with_the_keys_it_has(args, problem, listed, elsewhere, cli,
                                                                        tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    res = cli(*args, f"out_root={tmp_path / 'out'}", cwd=work)
    assert res.code == 2
    assert_no_traceback(res)
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and problem in lines[0] and f"its settings are {listed}" in lines[0], res.err
    if elsewhere:
        assert elsewhere in lines[0]
    assert list(work.iterdir()) == [] and not (tmp_path / "out").exists()


def test_a_run_dir_from_before_the_per_dataset_schemas_still_works(vaexp_main, tmp_path, tiny_args):
    """A config.yaml that lists every dataset's keys (as all did before) resumes, re-runs and
    re-evaluates as before."""
    run = tmp_path / "run"
    assert vaexp_main("train", *tiny_args, f"hydra.run.dir={run}").code == 0
    saved = OmegaConf.load(run / rundir.CONFIG)
    for key, value in {"path": None, "data_dir": None, "download": True, "dim": 20, "shuffle_seed": None}.items():
        saved.dataset[key] = value
    (run / rundir.CONFIG).write_text(OmegaConf.to_yaml(saved))
    res = vaexp_main("train", *tiny_args, f"hydra.run.dir={run}")          # the same command again
    assert res.code == 0 and "already finished" in res.out, res.err
    res = vaexp_main("eval", str(run), "progress=false")
    assert res.code == 0 and "test NLL" in res.out, res.err
    res = vaexp_main("train", f"resume={run}", "schedule.epochs=2", "progress=false")
    assert res.code == 0 and "resuming" in res.out, res.err


# --------------------------------------------------------------------------- 6. completion per command

def complete(cli, line: str, cwd=None):
    res = cli("-sc", "query=bash", env_extra={"COMP_LINE": line, "COMP_POINT": str(len(line))}, cwd=cwd)
    assert res.code == 0, res.err
    return res.out.split()


def test_each_command_completes_only_its_own_keys(cli):
    groups = {"dataset=", "model=", "objective=", "estimator=", "schedule=", "eval=", "experiment="}
    train = set(complete(cli, "vaexp train "))
    assert groups <= train and {"k=", "m=", "resume=", "seed="} <= train
    report = set(complete(cli, "vaexp report "))
    assert {"out=", "plots=", "curves="} <= report and not report & groups
    assert not {c for c in report if c.split("=")[0].split(".")[0] in {"k", "m", "seed", "dataset", "model"}}
    snr = set(complete(cli, "vaexp snr "))
    assert {"dataset=", "model=", "objective=", "draws=", "run=", "estimators."} <= snr
    assert not snr & {"eval=", "experiment=", "schedule=", "estimator="}
    evaluate = set(complete(cli, "vaexp eval "))
    assert {"eval=", "eval.", "run=", "device="} <= evaluate
    assert not evaluate & (groups - {"eval="})


def test_completion_after_a_positional_run_dir_and_of_dataset_keys(cli, tmp_path):
    (tmp_path / "run1").mkdir()
    assert complete(cli, "vaexp eval run1 ev", cwd=tmp_path) == ["eval.", "eval="]
    assert complete(cli, "vaexp report run1 o", cwd=tmp_path) == ["out="]
    assert complete(cli, "vaexp eval ./ru", cwd=tmp_path) == []            # a path: bash completes it
    keys = complete(cli, "vaexp train dataset=synthetic dataset.")
    assert "dataset.n_train=" in keys and "dataset.path=" not in keys
    assert "dataset.path=" in complete(cli, "vaexp train dataset.") and "dataset.n_train=" not in complete(
        cli, "vaexp train dataset.")


# --------------------------------------------------------------------------- 2. progress bar, resume messages

S = 5  # steps per epoch of the tiny runs (100 training images, batch 20)


def test_position_message_in_every_case():
    def msg(epoch, step, n=3):
        return loop.position_message({"epoch": epoch, "step": step}, n, S)

    assert msg(0, 2) == "0 of 3 epochs done, and 2 of the 5 steps of epoch 1; continuing epoch 1"
    assert msg(1, 0) == "1 of 3 epochs done; starting epoch 2"
    assert msg(2, 4) == "2 of 3 epochs done, and 4 of the 5 steps of epoch 3; continuing epoch 3"
    assert msg(1, 5) == "1 of 3 epochs done, and all 5 steps of epoch 2; finishing epoch 2 (validation, checkpoint)"
    assert msg(3, 0) == "training is complete (3/3 epochs); evaluating"
    assert msg(3, 0, n=2) == "training is complete (3 epochs; the schedule asks for 2); evaluating"
    assert [loop.progress_label(e, 3) for e in range(3)] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]


class Bars:
    """Stands in for tqdm: records every bar and, for each step, the label it was counted under."""

    def __init__(self):
        self.made = []

    def __call__(self, enabled, total, initial, desc):
        self.made.append({"enabled": enabled, "total": total, "initial": initial, "steps": []})
        if not enabled:
            return None
        record = self.made[-1]

        class Bar:
            label = desc

            def set_description(self, d, refresh=True):
                Bar.label = d

            def update(self, n=1):
                record["steps"] += [Bar.label] * n

            def set_postfix(self, **kw):
                pass

            def close(self):
                pass

        return Bar()

    def steps(self):
        return [s for b in self.made for s in b["steps"]]


@pytest.fixture
def bars(monkeypatch):
    b = Bars()
    monkeypatch.setattr(loop, "_progress", b)
    return b


def test_the_bar_shows_the_epoch_being_trained_fresh_and_resumed(vaexp_main, tmp_path, tiny_args, bars,
                                                                 monkeypatch):
    run = tmp_path / "run"
    args = [*tiny_args, "schedule.epochs=3", "progress=true", f"hydra.run.dir={run}"]
    monkeypatch.setenv("VAEXP_INTERRUPT_AT_STEP", str(S + 2))        # Ctrl-C after 2 steps of epoch 2
    res = vaexp_main("train", *args)
    assert res.code == 130 and "interrupted with 1 of 3 epochs done, and 2 of the 5 steps of epoch 2" in res.err
    assert bars.made[0]["initial"] == 0 and bars.made[0]["total"] == 3 * S
    assert bars.steps() == ["epoch 1/3"] * S + ["epoch 2/3"] * 2

    monkeypatch.setenv("VAEXP_INTERRUPT_AT_STEP", str(2 * S))        # ... then stop between epochs 2 and 3
    bars.made.clear()
    res = vaexp_main("train", f"resume={run}", "progress=true")
    assert res.code == 130, res.err
    assert f"resuming {run}: 1 of 3 epochs done, and 2 of the 5 steps of epoch 2; continuing epoch 2" in res.out
    assert bars.made[0]["initial"] == S + 2 and bars.steps() == ["epoch 2/3"] * (S - 2)

    monkeypatch.delenv("VAEXP_INTERRUPT_AT_STEP")
    bars.made.clear()
    res = vaexp_main("train", f"resume={run}", "progress=true")
    assert res.code == 0, res.err
    assert f"resuming {run}: 2 of 3 epochs done; starting epoch 3" in res.out
    assert bars.steps() == ["epoch 3/3"] * S


def test_a_run_that_lacks_only_its_evaluation_says_so_and_shows_no_bar(vaexp_main, tmp_path, tiny_args, bars,
                                                                      monkeypatch):
    import vaexp.evaluate

    run = tmp_path / "run"

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    real = vaexp.evaluate.evaluate
    monkeypatch.setattr(vaexp.evaluate, "evaluate", interrupted)    # Ctrl-C during the final evaluation
    res = vaexp_main("train", *tiny_args, "progress=true", f"hydra.run.dir={run}")
    assert res.code == 130 and "training is complete, checkpointed and recorded" in res.err
    monkeypatch.setattr(vaexp.evaluate, "evaluate", real)
    bars.made.clear()
    res = vaexp_main("train", f"resume={run}", "progress=true")
    assert res.code == 0, res.err
    assert f"resuming {run}: training is complete (1/1 epochs); evaluating" in res.out
    assert bars.made == [{"enabled": False, "total": S, "initial": S, "steps": []}]
    assert rundir.read_metrics(run)[0]["test"]["nll"] > 0


# --------------------------------------------------------------------------- 5. TensorBoard

def events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def experiment_of(ea):
    from tensorboard.plugins.hparams import metadata

    content = ea.PluginTagToContent(metadata.PLUGIN_NAME)
    return (metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG]),
            metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG]))


def test_hparams_flag_the_swept_keys_and_show_the_latest_evaluation(vaexp_main, tmp_path, tiny_args):
    out_root = tmp_path / "out"
    res = vaexp_main("train", "-m", *tiny_args, "objective=miwae", "m=1,2", "seed=0,1", "sweep=s",
                     f"out_root={out_root}")
    assert res.code == 0, res.err
    jobs = sorted(p.parent for p in (out_root / "multirun" / "s").glob("*/metrics.json"))
    assert len(jobs) == 4
    experiment, start = experiment_of(events(jobs[0]))
    differs = [h.name for h in experiment.hparam_infos if h.differs]
    assert sorted(differs) == ["m", "seed"]                          # the swept keys, shown first
    assert {"objective", "model", "k", "estimator", "dataset"} <= {h.name for h in experiment.hparam_infos}
    assert start.hparams["objective"].string_value == "miwae" and start.hparams["m"].number_value == 1
    tags = [m.name.tag for m in experiment.metric_infos]
    assert tags[:5] == ["hparam/test_nll", "hparam/train_bound", "hparam/active_units", "hparam/eval_n_test",
                        "hparam/eval_k"]                             # the five columns shown by default

    run = jobs[0]
    first = rundir.read_metrics(run)[0]["test"]
    ea = events(run)
    assert ea.Scalars("hparam/test_nll")[-1].value == pytest.approx(first["nll"], rel=1e-6)
    assert "eval/summary/text_summary" in ea.Tags()["tensors"]
    res = vaexp_main("eval", str(run), "eval.n_test=10", "eval.k=20", "progress=false")
    assert res.code == 0, res.err
    latest = rundir.read_metrics(run)[0]["test"]
    assert latest["n_test"] == 10 and latest["nll"] != first["nll"]
    ea = events(run)
    assert ea.Scalars("hparam/test_nll")[-1].value == pytest.approx(latest["nll"], rel=1e-6)
    assert ea.Scalars("hparam/eval_n_test")[-1].value == 10 and ea.Scalars("hparam/eval_k")[-1].value == 20
    assert ea.Scalars("reeval/nll")[-1].value == pytest.approx(latest["nll"], rel=1e-6)
    card = ea.Tensors("reeval/summary/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "vaexp eval" in card and f"{latest['nll']:.3f}" in card and "K=20, 10 images" in card


@pytest.mark.parametrize("objective,slug", [("miwae", "bound"), ("jvi", "jvi_estimate")])
def test_vaexp_eval_of_a_run_that_never_got_its_evaluation_gives_it_its_row(vaexp_main, tmp_path, tiny_args,
                                                                            monkeypatch, objective, slug):
    import vaexp.evaluate

    run = tmp_path / "run"
    real = vaexp.evaluate.evaluate

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(vaexp.evaluate, "evaluate", interrupted)    # Ctrl-C during the final evaluation
    assert vaexp_main("train", *tiny_args, f"objective={objective}", "m=2", f"hydra.run.dir={run}").code == 130
    monkeypatch.setattr(vaexp.evaluate, "evaluate", real)
    if objective == "jvi":  # and a run stopped in its second epoch: no train summary, only the history
        run = tmp_path / "run2"
        monkeypatch.setenv("VAEXP_INTERRUPT_AT_STEP", "7")
        assert vaexp_main("train", *tiny_args, f"objective={objective}", "m=2", "schedule.epochs=2",
                          f"hydra.run.dir={run}").code == 130
        monkeypatch.delenv("VAEXP_INTERRUPT_AT_STEP")
        assert not (rundir.read_metrics(run)[0] or {}).get("train")
    from tensorboard.plugins.hparams import metadata

    try:
        before = events(run).PluginTagToContent(metadata.PLUGIN_NAME)
    except KeyError:  # no hparams data at all
        before = {}
    assert metadata.SESSION_START_INFO_TAG not in before                              # no row yet
    assert vaexp_main("eval", str(run), "progress=false").code == 0
    experiment, start = experiment_of(events(run))
    assert {"m", "objective", "model.latents"} <= {h.name for h in experiment.hparam_infos if h.differs}
    assert start.hparams["m"].number_value == 2
    ea = events(run)
    assert ea.Scalars("hparam/test_nll")[-1].value == pytest.approx(rundir.read_metrics(run)[0]["test"]["nll"], rel=1e-6)
    tags = ea.Tags()["scalars"]
    # from the checkpoint's history, named by what the run trains on (jvi's estimate is no bound)
    assert {f"hparam/train_{slug}", f"hparam/valid_{slug}"} <= set(tags)
    assert slug == "bound" or not any("bound" in t for t in tags), tags


def test_a_lone_run_flags_the_keys_its_command_line_set(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
        ["objective=miwae", "m=4", "schedule.lr=0.01", "model.latents=[20]", "progress=false", "eval.k=100",
         "dataset.path=/d"]))
    assert tblog.varied_keys(tmp_path) == ["objective", "m", "schedule.lr", "model.latents"]
    cfg = OmegaConf.create({"dataset": {"name": "mnist"}, "model": {"name": "burda1", "latents": [20]},
                            "objective": {"name": "miwae"}, "estimator": {"name": "reparam"}, "m": 4, "k": 5,
                            "beta": 0.5, "seed": 0, "schedule": {"name": "burda", "lr": 0.01}, "batch_size": 20})
    values, differs = tblog.hparams(cfg, tblog.varied_keys(tmp_path))
    assert differs == ["objective", "m", "lr", "model.latents"]
    assert values["objective"] == "miwae" and values["lr"] == 0.01 and values["model.latents"] == "[20]"


def test_an_mk_sweep_flags_k_too(tmp_path):
    sweep = tmp_path / "sweep"
    (sweep / "job").mkdir(parents=True)
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(
        {"mk": 64, "hydra": {"overrides": {"task": ["objective=miwae,piwae", "m=1,2,4", "progress=false"]},
                             "sweeper": {"params": {"seed": "0,1"}}}}))
    assert sorted(tblog.varied_keys(sweep / "job")) == ["k", "m", "objective", "seed"]


def test_readme_documents_every_tensorboard_tag_group_and_every_run_file(vaexp_main, tmp_path, tiny_args):
    run = tmp_path / "run"
    assert vaexp_main("train", *tiny_args, "eval.every=1", "schedule.epochs=2", "log_every=2",
                      f"hydra.run.dir={run}").code == 0
    assert vaexp_main("eval", str(run), "eval.n_test=5", "progress=false").code == 0
    ea = events(run)
    tags = ea.Tags()
    groups = {t.split("/")[0] for t in tags["scalars"] + tags["images"]}
    groups |= {t.split("/")[0] for t in tags["tensors"] if t.endswith("/text_summary")}
    section = readme_section("TensorBoard")
    missing = sorted(g for g in groups if f"`{g}/" not in section and f"`{g}`" not in section)
    assert not missing, f"README's TensorBoard section does not name the tag groups {missing}"
    assert "HPARAMS" in section and "TEXT" in section

    outputs = readme_section("Outputs")
    names = set()
    for p in run.iterdir():
        name = re.sub(r"^events\.out\.tfevents\..*", "events.out.tfevents.*", p.name)
        names.add(re.sub(r"^test_log_px\.\d+\.pt$", "test_log_px.<n>.pt", name))
    missing = sorted(n for n in names if n not in outputs)
    assert not missing, f"README's Outputs section does not list {missing}"
    evals = json.loads((run / rundir.METRICS).read_text())["evals"]
    assert [e["per_example"] for e in evals] == ["test_log_px.0.pt", "test_log_px.1.pt"]   # training's, vaexp eval's


def test_readme_dataset_keys_table_is_the_schemas():
    from vaexp.cli.configs import dataset_keys, dataset_options

    rows = re.findall(r"^\| `([a-z_]+)`(?:, `([a-z_]+)`)? \| (.+) \|$", readme_section("Commands"), re.M)
    listed = {}
    for first, second, keys in rows:
        if first in dataset_options():
            named = re.findall(r"`([a-z_]+)`", keys)
            for option in filter(None, (first, second)):
                listed[option] = set(named)
    listed["omniglot"] |= listed["mnist"]   # "the same with ..."
    assert set(listed) == set(dataset_options())
    for option, keys in listed.items():
        assert keys == set(dataset_keys(option)) - {"name"}, option


def _steps_in_both_readers(run_dir: Path, tag: str):
    """A tag's steps as the legacy EventAccumulator (vaexp report's) and TensorBoard's own data
    provider's accumulator read them: both honour session STARTs, differently (see tblog.RunLogger)."""
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea

    legacy = [e.step for e in events(run_dir).Scalars(tag)]
    acc = pea.EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return legacy, [e.step for e in acc.Tensors(tag)]


@pytest.mark.parametrize("first_session", [0, None])  # None: a directory a vaexp before sessions wrote
def test_a_resumed_session_hides_a_killed_process_tail_and_keeps_the_checkpoint_step(tmp_path, first_session):
    from vaexp.tblog import RunLogger

    killed = RunLogger(tmp_path, session=first_session)
    killed.scalars({"x": 0.0}, 0)
    for step in range(1, 9):  # the checkpoint was at step 5; the process logged on to 8, then died
        killed.scalars({"x": float(step)}, step)
    killed.close()
    resumed = RunLogger(tmp_path, session=5 + 1)
    for step in range(6, 11):
        resumed.scalars({"x": 100.0 + step}, step)
    resumed.close()
    legacy, provider = _steps_in_both_readers(tmp_path, "x")
    assert legacy == provider == list(range(0, 11))
    assert [e.value for e in events(tmp_path).Scalars("x")][5:7] == [5.0, 106.0]


def test_a_run_resumed_at_an_epoch_end_keeps_every_point_of_that_step(vaexp_main, tmp_path, tiny_args, monkeypatch):
    """Interrupted right after epoch 1's checkpoint (step 5, whose epoch/, eval/ and train/ points
    were logged before it), then resumed: TensorBoard holds the points of the uninterrupted run."""
    args = [*tiny_args, "schedule.epochs=3", "log_every=1", "eval.every=1", "progress=false"]
    assert vaexp_main("train", *args, f"hydra.run.dir={tmp_path / 'ref'}").code == 0
    monkeypatch.setenv("VAEXP_INTERRUPT_AT_STEP", "5")
    assert vaexp_main("train", *args, f"hydra.run.dir={tmp_path / 'run'}").code == 130
    monkeypatch.delenv("VAEXP_INTERRUPT_AT_STEP")
    assert vaexp_main("train", f"resume={tmp_path / 'run'}", "progress=false").code == 0
    for tag in ("train/bound", "epoch/train_bound", "eval/nll", "epoch/lr"):
        want = _steps_in_both_readers(tmp_path / "ref", tag)
        assert _steps_in_both_readers(tmp_path / "run", tag) == want and 5 in want[0], tag
    # vaexp eval adds to a run without starting a session: extending it later keeps its points
    assert vaexp_main("eval", str(tmp_path / "run"), "eval.k=20", "progress=false").code == 0
    assert vaexp_main("train", f"resume={tmp_path / 'run'}", "schedule.epochs=4", "progress=false").code == 0
    legacy, provider = _steps_in_both_readers(tmp_path / "run", "reeval/nll")
    assert legacy == provider == [15]
    assert _steps_in_both_readers(tmp_path / "run", "epoch/train_bound")[0] == [5, 10, 15, 20]


def test_vaexp_eval_with_other_report_k_never_mixes_two_evaluations_in_the_row(vaexp_main, tmp_path, tiny_args):
    run = tmp_path / "run"
    assert vaexp_main("train", *tiny_args, "progress=false", f"hydra.run.dir={run}").code == 0
    assert events(run).Scalars("hparam/L1")[-1].value == pytest.approx(rundir.read_metrics(run)[0]["test"]["L1"])
    res = vaexp_main("eval", str(run), "eval.k=20", "eval.report_k=[5]", "progress=false")
    assert res.code == 0, res.err
    ea = events(run)
    assert math.isnan(ea.Scalars("hparam/L1")[-1].value)          # of the earlier evaluation: not shown
    assert ea.Scalars("hparam/L5")[-1].value == pytest.approx(rundir.read_metrics(run)[0]["test"]["L5"], rel=1e-6)
    assert "reeval/active_units_1" in ea.Tags()["scalars"]
