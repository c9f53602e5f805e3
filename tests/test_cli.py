"""The `vaexp` command line end to end: train, eval, multirun, bad input, help and completion.

Runs are tiny (synthetic data, 100 training images, a 4-unit model, one epoch, K=10). Training
runs go in-process where a process boundary does not matter (fast); exit codes, stderr, help,
completion and multirun go through a real `python -m vaexp` process.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List

import pytest
import torch
import yaml

from conftest import run_main

OBJECTIVES = {  # objective -> extra overrides
    "vae": [],
    "iwae": [],
    "miwae": ["m=2"],
    "ciwae": ["beta=0.3"],
    "piwae": ["m=2", "k=2"],
}
ESTIMATORS = ["reparam", "stl", "dreg"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- helpers

def train_run_dirs(out_root: Path) -> List[Path]:
    return sorted(p for p in (out_root / "train").iterdir() if p.is_dir()) if (out_root / "train").exists() else []


def load_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def snapshot(run_dir: Path, names=("config.yaml", "checkpoint.pt", "metrics.json")) -> dict:
    """Bytes and mtime of the files a run is made of."""
    return {n: ((run_dir / n).read_bytes(), (run_dir / n).stat().st_mtime_ns) for n in names if (run_dir / n).exists()}


def check_test_metrics(test: dict, k: int, latents: List[int]) -> None:
    assert test["k"] == k
    assert math.isfinite(test["nll"]) and test["nll"] > 0
    assert test[f"L{k}"] == -test["nll"]
    # L1 averages all K log-weights, L_K is their logmeanexp: Jensen makes L1 <= L_K exactly.
    assert test["L1"] <= test[f"L{k}"] + 1e-9
    assert len(test["active_units"]) == len(latents)
    assert test["latent_units"] == latents
    assert all(0 <= a <= u for a, u in zip(test["active_units"], test["latent_units"]))


def assert_no_traceback(res) -> None:
    assert "Traceback" not in res.out + res.err, res.out + res.err


# --------------------------------------------------------------------------- 1. training, every combination

@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_train_one_epoch(objective, estimator, tiny_args, tiny_args_2layer, vaexp_main, tmp_path):
    # dreg runs use two stochastic layers: the lw_bar path through q(z2|z1) is the subtle one.
    two_layers = estimator == "dreg"
    base = tiny_args_2layer if two_layers else tiny_args
    latents = [4, 3] if two_layers else [4]
    extra = OBJECTIVES[objective]
    out_root = tmp_path / "out"
    res = vaexp_main("train", *base, f"objective={objective}", f"estimator={estimator}", *extra,
                     f"out_root={out_root}")
    assert res.code == 0, res.err
    assert "test NLL" in res.out

    (run_dir,) = train_run_dirs(out_root)
    settings = dict(o.split("=") for o in ["m=1", "k=5", "beta=0.5", *extra])
    m, k = int(settings["m"]), int(settings["k"])
    model = "burda2" if two_layers else "burda1"
    assert run_dir.name.endswith(f"_synthetic_{model}_{objective}_m{m}_k{k}_{estimator}")

    metrics = load_metrics(run_dir)
    check_test_metrics(metrics["test"], 10, latents)
    assert metrics["train"]["epochs"] == 1 and metrics["train"]["steps"] == 5
    assert math.isfinite(metrics["train"]["bound"])
    assert len(metrics["evals"]) == 1

    for name in ("checkpoint.pt", "config.yaml", "test_log_px.pt"):
        assert (run_dir / name).is_file(), name
    events = list(run_dir.glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)

    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["state"]["global_step"] == 5 and ckpt["state"]["epoch"] == 1
    assert ckpt["config"]["objective"]["name"] == objective
    assert ckpt["config"]["estimator"]["name"] == estimator
    assert (ckpt["config"]["m"], ckpt["config"]["k"]) == (m, k)
    assert ckpt["config"]["beta"] == float(settings["beta"])
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())

    per_example = torch.load(run_dir / "test_log_px.pt", weights_only=False)
    assert per_example["log_px"].dtype == torch.float64 and per_example["log_px"].shape == (20,)
    assert float(-per_example["log_px"].mean()) == pytest.approx(metrics["test"]["nll"], rel=1e-12)


# --------------------------------------------------------------------------- a trained run to reuse

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_args):
    """One finished tiny run in <tmp>/run (hydra.run.dir), shared by the eval and re-run tests."""
    root = tmp_path_factory.mktemp("trained")
    run_dir = root / "run"
    args = ["train", *tiny_args, f"hydra.run.dir={run_dir}"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VAEXP_DATA_DIR", str(root / "data"))
        mp.delenv("VAEXP_INTERRUPT_AT_STEP", raising=False)
        assert run_main(args) == 0
    assert (run_dir / "metrics.json").is_file()
    return run_dir, args


# --------------------------------------------------------------------------- 2. vaexp eval

def test_eval_appends_and_reproduces_training_eval(trained_run, cli):
    run_dir, _ = trained_run
    before = load_metrics(run_dir)
    files = snapshot(run_dir, ("config.yaml", "checkpoint.pt"))
    res = cli("eval", run_dir, "eval.k=10", "eval.au_samples=4", "progress=false")
    assert res.code == 0, res.err
    assert_no_traceback(res)
    assert "test NLL" in res.out and "active units" in res.out
    after = load_metrics(run_dir)
    assert len(after["evals"]) == len(before["evals"]) + 1
    assert after["train"] == before["train"]
    # Same eval settings and seeds as the evaluation at the end of training: exactly the same numbers.
    assert after["test"]["nll"] == before["test"]["nll"]
    assert after["evals"][-1]["nll"] == before["test"]["nll"]
    assert after["test"]["active_units"] == before["test"]["active_units"]
    assert snapshot(run_dir, ("config.yaml", "checkpoint.pt")) == files  # eval never touches the run itself
    assert not (run_dir / ".hydra" / "eval").exists()


def test_eval_defaults_to_the_runs_own_settings(trained_run, cli):
    """Without eval.* overrides, `vaexp eval` repeats the run's own evaluation (here K=10, not the
    group default 5000) and gets exactly its numbers."""
    run_dir, _ = trained_run
    before = load_metrics(run_dir)
    res = cli("eval", run_dir, "progress=false")
    assert res.code == 0, res.err
    assert "K=10" in res.out
    after = load_metrics(run_dir)
    assert after["test"]["k"] == 10
    assert after["test"]["nll"] == before["evals"][0]["nll"]  # the evaluation at the end of training


def test_eval_with_other_settings(trained_run, cli):
    run_dir, _ = trained_run
    before = load_metrics(run_dir)
    res = cli("eval", run_dir, "eval.k=20", "eval.n_test=10", "eval.report_k=[1,4]", "eval.au_samples=4",
              "progress=false")
    assert res.code == 0, res.err
    assert "K=20" in res.out and "L4" in res.out
    after = load_metrics(run_dir)
    assert len(after["evals"]) == len(before["evals"]) + 1
    assert after["evals"][:-1] == before["evals"]  # earlier evaluations are kept as they were
    assert after["train"] == before["train"]
    test = after["test"]
    assert test["n_test"] == 10
    check_test_metrics(test, 20, [4])
    assert test["L1"] <= test["L4"] + 1e-9 <= test["L20"] + 2e-9  # nested groups of the same samples
    per_example = torch.load(run_dir / "test_log_px.pt", weights_only=False)
    assert per_example["log_px"].shape == (10,)
    # Each evaluation keeps its own per-image file; the earlier ones are not overwritten.
    files = [run_dir / e["per_example"] for e in after["evals"]]
    assert len(set(files)) == len(files) and all(f.is_file() for f in files)
    assert torch.load(files[0], weights_only=False)["log_px"].shape == (20,)


# --------------------------------------------------------------------------- 5 (CLI part). re-running a run dir

def test_rerun_of_finished_run_does_not_retrain(trained_run, vaexp_main):
    run_dir, args = trained_run
    files = snapshot(run_dir)
    res = vaexp_main(*args)
    assert res.code == 0, res.err
    assert "already finished" in res.out and "test NLL" in res.out
    assert snapshot(run_dir) == files


def test_rerun_of_a_run_recorded_with_an_older_default_of_an_idle_setting(trained_run, vaexp_main, tmp_path):
    """A config.yaml from before gdreg's default alpha became 0.9 holds diagnostics.alpha: 0.5;
    with the diagnostics off that setting does nothing, so re-running the command still finds
    the run (a sweep re-run would otherwise fail every finished job)."""
    import shutil

    run_dir, args = trained_run
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    cfg = yaml.safe_load((old / "config.yaml").read_text())
    assert cfg["diagnostics"]["every"] is None
    cfg["diagnostics"]["alpha"] = 0.5
    (old / "config.yaml").write_text(yaml.safe_dump(cfg))
    args = [a for a in args if not a.startswith("hydra.run.dir=")] + [f"hydra.run.dir={old}"]
    res = vaexp_main(*args)
    assert res.code == 0 and "already finished" in res.out, res.err
    res = vaexp_main(*args, "diagnostics.every=5")   # switched on, the alpha matters: told, not run
    assert res.code == 2 and "diagnostics.alpha" in res.err, res.err


def test_rerun_with_other_setting_fails_and_changes_nothing(trained_run, vaexp_main):
    run_dir, args = trained_run
    # Hydra's own record (.hydra/) included: the check runs before Hydra writes it.
    files = snapshot(run_dir, ("config.yaml", "checkpoint.pt", "metrics.json", ".hydra/overrides.yaml",
                               ".hydra/config.yaml"))
    res = vaexp_main(*args, "k=3")
    assert res.code != 0
    assert "k=3" in res.err and "saved: 5" in res.err and str(run_dir) in res.err
    assert_no_traceback(res)
    assert snapshot(run_dir, ("config.yaml", "checkpoint.pt", "metrics.json", ".hydra/overrides.yaml",
                              ".hydra/config.yaml")) == files


def test_resume_with_changed_setting_fails(trained_run, vaexp_main):
    run_dir, _ = trained_run
    files = snapshot(run_dir)
    res = vaexp_main("train", f"resume={run_dir}", "k=7", "progress=false")
    assert res.code != 0
    assert "trained with k=5" in res.err and "resume=" in res.err
    # what may change, as it is written on a command line (groups as <group>.*)
    assert "schedule.epochs, eval.*, diagnostics.* may change" in res.err and "out_root" not in res.err
    assert_no_traceback(res)
    assert snapshot(run_dir) == files


def test_resume_is_checked_with_the_runs_own_settings(vaexp_main, tmp_path, tiny_args):
    """The callback checks the composed defaults (iwae k=5, mnist) with the overrides; resume=
    continues the run's own settings, so what they refuse is refused before anything is written
    (it used to be recorded, then fail every resume as a bug, or pass silently)."""
    run_dir = tmp_path / "run"
    assert vaexp_main("train", *tiny_args, "objective=vae", "k=1", f"hydra.run.dir={run_dir}").code == 0
    files = snapshot(run_dir, ("config.yaml", "checkpoint.pt", "metrics.json", ".hydra/overrides.yaml"))
    res = vaexp_main("train", f"resume={run_dir}", "schedule.epochs=2", "diagnostics.every=2",
                     "diagnostics.estimators=[rws]", "progress=false")
    assert res.code == 2, res.err
    assert_no_traceback(res)
    assert f"resume={run_dir} (its own settings with the overrides)" in res.err and "rws" in res.err
    assert snapshot(run_dir, ("config.yaml", "checkpoint.pt", "metrics.json", ".hydra/overrides.yaml")) == files
    # the run's own dataset: 20 validation images (the defaults' mnist has more)
    res = vaexp_main("train", f"resume={run_dir}", "schedule.epochs=2", "diagnostics.every=2",
                     "diagnostics.batch=25", "progress=false")
    assert res.code == 2 and "diagnostics.batch=25" in res.err and "dataset.n_valid=20" in res.err, res.err
    assert snapshot(run_dir, ("config.yaml", "checkpoint.pt", "metrics.json", ".hydra/overrides.yaml")) == files
    res = vaexp_main("train", f"resume={run_dir}", "schedule.epochs=2", "diagnostics.every=2",
                     "diagnostics.batch=10", "progress=false")  # within the run's own: trains on
    assert res.code == 0, res.err
    assert load_metrics(run_dir)["train"]["epochs"] == 2


def test_rerun_with_new_eval_settings_points_to_vaexp_eval(trained_run, vaexp_main):
    run_dir, args = trained_run
    res = vaexp_main(*args, "eval.k=7")
    assert res.code == 2 and f"`vaexp eval {run_dir} eval.k=7` evaluates it" in res.err, res.err


def test_resume_of_a_finished_run_with_more_epochs_trains_on(vaexp_main, tmp_path, tiny_args):
    run_dir = tmp_path / "run"
    assert vaexp_main("train", *tiny_args, f"hydra.run.dir={run_dir}").code == 0
    first = load_metrics(run_dir)
    original_hydra = (run_dir / ".hydra" / "overrides.yaml").read_text()
    res = vaexp_main("train", f"resume={run_dir}", "schedule.epochs=2", "progress=false")
    assert res.code == 0, res.err
    assert "already finished" not in res.out
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["state"]["epoch"] == 2 and ckpt["state"]["global_step"] == 10
    after = load_metrics(run_dir)
    assert after["train"]["epochs"] == 2 and len(after["evals"]) == len(first["evals"]) + 1
    # The effective config is recorded; the one it replaced is kept, and so is Hydra's first record.
    assert "epochs: 2" in (run_dir / "config.yaml").read_text()
    assert len(list(run_dir.glob("config.*.yaml"))) == 1
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == original_hydra
    assert list((run_dir / ".hydra").glob("resume-*/overrides.yaml"))


# --------------------------------------------------------------------------- 3. multirun

def test_multirun_two_jobs_and_eval_of_a_job_dir(cli, tmp_path, tiny_args):
    out_root = tmp_path / "out"
    res = cli("train", "-m", "k=1,2", *tiny_args, f"out_root={out_root}")
    assert res.code == 0, res.err
    assert_no_traceback(res)
    (sweep,) = [p for p in (out_root / "multirun").iterdir()]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2
    for job, k in zip(sorted(jobs, key=lambda p: "k=2" in p.name.split(",")), (1, 2)):
        parts = job.name.split(",")
        assert f"k={k}" in parts and "dataset=synthetic" in parts
        assert not any(p.startswith(("out_root=", "progress=")) for p in parts)  # excluded keys
        metrics = load_metrics(job)
        check_test_metrics(metrics["test"], 10, [4])
        ckpt = torch.load(job / "checkpoint.pt", map_location="cpu", weights_only=False)
        assert ckpt["config"]["k"] == k
    assert not (out_root / "train").exists()

    # `vaexp eval <job dir>`: the name holds '=' and ',' (and '[', ']'), yet it is a directory.
    job = next(j for j in jobs if "k=1" in j.name.split(","))
    assert "=" in job.name and "," in job.name
    n_evals = len(load_metrics(job)["evals"])
    res = cli("eval", job, "eval.k=10", "eval.au_samples=4", "progress=false")
    assert res.code == 0, res.err
    assert "test NLL" in res.out
    after = load_metrics(job)
    assert len(after["evals"]) == n_evals + 1
    assert after["test"]["nll"] == after["evals"][0]["nll"]

    # ... and relative to the working directory, too.
    res = cli("eval", job.name, "eval.k=10", "eval.au_samples=4", "progress=false", cwd=sweep)
    assert res.code == 0, res.err
    assert len(load_metrics(job)["evals"]) == n_evals + 2

    # resume=<job dir> with its '=' and ',' needs no quoting either: the finished job is reported.
    res = cli("train", f"resume={job}", "progress=false")
    assert res.code == 0, res.err
    assert "already finished" in res.out


# --------------------------------------------------------------------------- 4. bad input

BAD_TRAIN = [  # overrides, words the message must contain
    (["k=0"], ["k=0"]),
    (["m=0"], ["m=0"]),
    (["beta=1.5"], ["beta=1.5"]),
    (["objective=iwae", "m=4"], ["m=4", "miwae"]),
    (["eval.k=0"], ["eval.k=0"]),
    (["kk=3"], ["kk"]),
    (["k=abc"], ["k=abc"]),
    (["objective=iwea"], ["iwea", "ciwae", "iwae", "miwae", "piwae", "vae"]),
    (["device=gpu"], ["gpu", "auto", "cpu", "cuda"]),
    (["resume={tmp}/no-such-run"], ["resume=", "no-such-run"]),
    (["-m", "k=1,0"], ["k=0"]),
    (["-m", "objective=iwae", "m=1,3"], ["m=3", "miwae"]),
    # the other kind of model's settings: ignored by this model, so refused (not recorded)
    (["model.q_var=0.1"], ["model.q_var=0.1", "model=burda1 has no setting q_var", "model=gaussian"]),
    (["model.learn_q_var=true"], ["model.learn_q_var=True", "model=gaussian"]),
    (["model=gaussian", "dataset=gaussian", "model.latents=[20]"], ["model.hidden=[8]", "model=gaussian has no"]),
]


def _assert_nothing_created(work: Path, out_root: Path) -> None:
    assert not out_root.exists(), sorted(str(p) for p in out_root.rglob("*"))
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("overrides,words", BAD_TRAIN, ids=[" ".join(o) for o, _ in BAD_TRAIN])
def test_bad_train_input(overrides, words, cli, tmp_path, tiny_args):
    work, out_root = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    overrides = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    flags = [o for o in overrides if o.startswith("-")]  # Hydra wants its flags before the overrides
    overrides = [o for o in overrides if not o.startswith("-")]
    res = cli("train", *flags, *tiny_args, *overrides, f"out_root={out_root}", cwd=work)
    assert res.code != 0
    assert_no_traceback(res)
    for word in words:
        assert word in res.err, (word, res.err)
    _assert_nothing_created(work, out_root)


@pytest.mark.skipif(torch.cuda.is_available(), reason="device=cuda is valid here")
def test_device_cuda_without_gpu(cli, tmp_path, tiny_args):
    work, out_root = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    res = cli("train", *tiny_args, "device=cuda", f"out_root={out_root}", cwd=work)
    assert res.code != 0
    assert_no_traceback(res)
    assert "device=cuda" in res.err
    _assert_nothing_created(work, out_root)


def test_eval_of_a_directory_that_is_not_a_run(cli, tmp_path):
    not_run = tmp_path / "not-a-run"
    not_run.mkdir()
    (not_run / "notes.txt").write_text("hello")
    work = tmp_path / "work"
    work.mkdir()
    for target in (not_run, tmp_path / "missing"):
        res = cli("eval", target, "progress=false", cwd=work)
        assert res.code != 0
        assert_no_traceback(res)
        assert "not a vaexp run directory" in res.err and str(target) in res.err
    assert sorted(p.name for p in not_run.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "missing").exists()
    assert list(work.iterdir()) == []

    res = cli("eval", "eval.k=0", cwd=work)  # no run directory at all
    assert res.code != 0 and "run directory" in res.err
    assert list(work.iterdir()) == []


def test_eval_rejects_bad_eval_settings(trained_run, cli):
    run_dir, _ = trained_run
    files = snapshot(run_dir)
    res = cli("eval", run_dir, "eval.k=0")
    assert res.code != 0 and "eval.k=0" in res.err
    assert_no_traceback(res)
    assert snapshot(run_dir) == files


def test_missing_data_leaves_no_run_directory(cli, tmp_path, tiny_args):
    out_root = tmp_path / "out"
    res = cli("train", "dataset=fashion_mnist", f"dataset.path={tmp_path / 'nowhere'}", "progress=false",
              f"out_root={out_root}")
    assert res.code == 2 and "dataset.path=" in res.err
    assert_no_traceback(res)
    assert not list((out_root / "train").glob("*")) if (out_root / "train").exists() else True


def test_unknown_command(cli, tmp_path):
    res = cli("bogus", "k=3")
    assert res.code != 0
    assert "bogus" in res.err and "train" in res.err and "eval" in res.err
    assert_no_traceback(res)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- 7. help, --cfg, completion

def test_top_level_help(cli, vaexp_main):
    res = cli("--help")  # python -m vaexp --help
    assert res.code == 0
    assert "train" in res.out and "eval" in res.out and "usage" in res.out.lower()
    res = cli()  # no command: the usage, as an error (issue 9, case 17)
    assert res.code == 2 and "train" in res.err and "eval" in res.err and "no command" in res.err
    assert_no_traceback(res)
    res = vaexp_main("--help")  # the `vaexp` console script's entry point
    assert res.code == 0 and "vaexp <command>" in res.out and "train" in res.out and "eval" in res.out


def test_eval_help(cli, tmp_path):
    res = cli("eval", "--help")
    assert res.code == 0, res.err
    assert "vaexp eval" in res.out and "run:" in res.out
    assert list(tmp_path.iterdir()) == []


def test_train_help_lists_config_groups(cli, tmp_path):
    res = cli("train", "--help")
    assert res.code == 0, res.err
    assert "== Config groups ==" in res.out
    assert "objective: ciwae, iwae, jvi, miwae, piwae, vae" in res.out
    assert "estimator: dreg, dreg_norm, gdreg, reparam, rws, rws_dreg, rws_dreg_norm, stl, vimco" in res.out
    assert "not a bound" in res.out and "diagnostics.every" in res.out
    assert "model: burda1, burda2" in res.out
    assert not (tmp_path / "outputs").exists()


def test_train_cfg_job_prints_config(cli, tmp_path):
    res = cli("train", "--cfg", "job")
    assert res.code == 0, res.err
    assert "objective:" in res.out and "\nk: 5\n" in res.out and "estimator:" in res.out
    res = cli("train", "--cfg", "job", "objective=miwae", "m=3")
    assert res.code == 0, res.err
    assert "name: miwae" in res.out and "\nm: 3\n" in res.out
    assert not (tmp_path / "outputs").exists()


def test_cfg_hydra_resolves_the_run_directory(vaexp_main, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Hydra resolves `--cfg hydra` cut off from the job's keys, which the run directory interpolates
    res = vaexp_main("train", "k=50", "--cfg", "hydra", "--resolve")
    assert res.code == 0, res.err
    assert res.out.startswith("# @package hydra\n") and "_m1_k50_reparam\n" in res.out and "${" not in res.out
    res = vaexp_main("train", "--cfg", "hydra")  # unresolved: Hydra's own form, untouched
    assert res.code == 0 and res.out.startswith("hydra:\n") and "${out_root}" in res.out
    assert not (tmp_path / "outputs").exists()


def test_hydra_flags_may_follow_overrides(cli, tmp_path):
    res = cli("train", "objective=miwae", "m=3", "--cfg", "job")
    assert res.code == 0, res.err
    assert "name: miwae" in res.out and "\nm: 3\n" in res.out
    assert not (tmp_path / "outputs").exists()


def test_completion_of_group_options(cli):
    line = "vaexp train objective="
    res = cli("-sc", "query=bash", env_extra={"COMP_LINE": line, "COMP_POINT": str(len(line))})
    assert res.code == 0, res.err
    options = res.out.split()
    assert "objective=miwae" in options and "objective=piwae" in options


def test_completion_of_command_word(cli):
    line = "vaexp tr"
    res = cli("-sc", "query=bash", env_extra={"COMP_LINE": line, "COMP_POINT": str(len(line))})
    assert res.code == 0, res.err
    assert res.out.split() == ["train"]


def test_completion_install_script(cli):
    res = cli("-sc", "install=bash")
    assert res.code == 0, res.err
    assert "complete" in res.out and "hydra_bash_completion" in res.out


# --------------------------------------------------------------------------- the rest of the estimator family

NEW_RUNS = [  # estimator, objective, extra overrides, two stochastic layers?
    ("rws", "iwae", [], True),
    ("rws_dreg", "miwae", ["m=2", "k=3"], False),
    ("gdreg", "piwae", ["m=2", "k=2", "estimator.alpha=0.3"], True),
    ("dreg_norm", "ciwae", ["m=2", "beta=0.3"], False),
    ("rws_dreg_norm", "iwae", [], False),
    ("vimco", "jvi", ["k=3"], True),
    ("reparam", "jvi", ["m=2", "k=3"], False),
    ("stl", "jvi", [], False),
    ("dreg", "jvi", [], True),
    ("rws", "jvi", ["k=2"], False),
]


@pytest.mark.parametrize("estimator,objective,extra,two", NEW_RUNS, ids=[f"{e}-{o}" for e, o, _, _ in NEW_RUNS])
def test_train_one_epoch_new_estimators_and_jvi(estimator, objective, extra, two, tiny_args, tiny_args_2layer,
                                                vaexp_main, tmp_path):
    out_root = tmp_path / "out"
    res = vaexp_main("train", *(tiny_args_2layer if two else tiny_args), f"objective={objective}",
                     f"estimator={estimator}", *extra, f"out_root={out_root}")
    assert res.code == 0, res.err
    (run_dir,) = train_run_dirs(out_root)
    metrics = load_metrics(run_dir)
    check_test_metrics(metrics["test"], 10, [4, 3] if two else [4])
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["state"]["global_step"] == 5 and ckpt["config"]["estimator"]["name"] == estimator
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    if estimator == "gdreg":
        assert ckpt["config"]["estimator"]["alpha"] == 0.3
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(run_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    if objective == "jvi":  # not a bound: never called one
        assert metrics["train"]["quantity"] == "JVI estimate" and math.isfinite(metrics["train"]["jvi_estimate"])
        assert "bound" not in metrics["train"] and "valid_bound" not in metrics["train"]
        assert "final train JVI estimate" in res.out and "bound" not in res.out.split("test NLL")[0].lower()
        assert {"epoch/train_jvi_estimate", "epoch/valid_jvi_estimate"} <= tags
        assert not any("bound" in t for t in tags), tags
    else:
        assert metrics["train"]["quantity"] == "bound" and math.isfinite(metrics["train"]["bound"])
        assert "epoch/train_bound" in tags


REFUSED = [  # overrides, words the one line must contain
    (["estimator=rws", "objective=vae"], ["estimator=rws with objective=vae", "plain mean", "expectation 0"]),
    (["estimator=rws_dreg", "objective=ciwae"], ["objective=ciwae", "beta*vae term"]),
    (["estimator=vimco", "objective=vae"], ["vimco", "leave-one-out"]),
    (["estimator=vimco", "k=1"], ["estimator=vimco with objective=iwae k=1", "k >= 2"]),
    (["estimator=vimco", "objective=jvi", "k=2"], ["objective=jvi k=2", "k >= 3"]),
    (["estimator=rws", "k=1"], ["k=1", "expectation 0", "k >= 2"]),
    (["estimator=gdreg", "k=1"], ["gdreg mixes in rws_dreg", "k >= 2"]),
    (["estimator=dreg_norm", "objective=jvi"], ["dreg_norm", "non-negative weights", "jvi"]),
    (["objective=jvi", "k=1"], ["objective=jvi with k=1", "k >= 2"]),
    (["estimator=dreg", "estimator.alpha=0.3"], ["estimator.alpha=0.3 with estimator=dreg", "only gdreg"]),
    (["estimator=gdreg", "estimator.alpha=1.5"], ["estimator.alpha=1.5", "[0, 1]"]),
    (["-m", "estimator=dreg,rws", "objective=vae"], ["estimator=rws with objective=vae", "in the sweep job"]),
    # sample counts past any device (torch's size arithmetic overflows before memory runs out)
    (["k=9223372036854775807"], ["m=1 k=9223372036854775807 batch_size=20", "2^31", "lower k, m or batch_size"]),
    (["objective=miwae", "m=9223372036854775807"], ["m=9223372036854775807", "lower k, m or batch_size"]),
    (["k=99999999999999999999"], ["k=99999999999999999999", "2^31"]),
    (["eval.k=10000000000"], ["eval.k=10000000000", "lower eval.k"]),
    (["eval.k=100", "eval.chunk=100000000"], ["eval.chunk=100000000 eval.k=100", "lower eval.chunk"]),
]


@pytest.mark.parametrize("overrides,words", REFUSED, ids=[" ".join(o) for o, _ in REFUSED])
def test_undefined_combinations_are_refused_before_any_directory(overrides, words, vaexp_main, tiny_args, tmp_path):
    out_root = tmp_path / "out"
    flags = [o for o in overrides if o.startswith("-")]
    rest = [o for o in overrides if not o.startswith("-")]
    res = vaexp_main("train", *flags, *tiny_args, *rest, f"out_root={out_root}")
    assert res.code != 0
    assert_no_traceback(res)
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vaexp: "), res.err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not out_root.exists()


EMPTY_PATHS = [  # e.g. out_root=$OUT with OUT unset: the file-system root, or the working directory
    (["train", "out_root="], "out_root=: an empty path"),
    (["train", "hydra.run.dir="], "hydra.run.dir=: an empty path"),
    (["train", "resume="], "resume=: an empty path"),
    (["train", "-m", "k=1,2", "sweep="], "sweep=: an empty path"),
    (["train", "dataset.path="], "dataset.path=: an empty path"),  # (the default dataset, mnist)
    (["eval", "run="], "run=: an empty path"),
    (["snr", "out_root="], "out_root=: an empty path"),
    (["report", "runs", "out="], "out=: an empty path"),
    (["compare", "runs", "out="], "out=: an empty path"),
]


@pytest.mark.parametrize("args,words", EMPTY_PATHS, ids=[" ".join(a) for a, _ in EMPTY_PATHS])
def test_an_empty_path_setting_is_refused_before_any_directory(args, words, vaexp_main, tiny_args, tmp_path,
                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = list(tiny_args) if args[0] == "train" and "dataset.path=" not in args else []
    flags = [a for a in args[1:] if a.startswith("-")]
    res = vaexp_main(args[0], *flags, *extra, *[a for a in args[1:] if not a.startswith("-")])
    assert res.code == 2, res.err
    assert_no_traceback(res)
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0] and "give a directory" in lines[0], res.err
    assert list(tmp_path.iterdir()) == []


def test_refused_combination_exit_status_in_a_real_process(cli, tmp_path, tiny_args):
    work, out_root = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    res = cli("train", *tiny_args, "estimator=rws", "objective=vae", f"out_root={out_root}", cwd=work)
    assert res.code == 2 and res.err.strip().count("\n") == 0 and "estimator=rws with objective=vae" in res.err
    _assert_nothing_created(work, out_root)


def test_two_mode_flags_are_one_line_not_a_traceback(vaexp_main):
    res = vaexp_main("train", "-m", "experiment=iwae_table1", "--cfg", "job")
    assert res.code == 2 and "-m and --cfg cannot be combined" in res.err and "Traceback" not in res.err
