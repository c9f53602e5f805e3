"""Sweeps: the M·K budget, named sweep directories, failed jobs that do not stop a sweep, re-runs
that skip finished jobs and resume interrupted ones, the experiment presets, and the joblib and
submitit launchers. Runs are tiny (see conftest.TINY_RUN)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import TINY_BURDA1, TINY_RUN

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = TINY_RUN + TINY_BURDA1


def jobs(sweep: Path):
    return sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


def config_of(job: Path) -> dict:
    return yaml.safe_load((job / "config.yaml").read_text())


def finished(job: Path) -> bool:
    return (job / "metrics.json").is_file() and "test" in json.loads((job / "metrics.json").read_text())


def no_traceback(res) -> None:
    assert "Traceback" not in res.out + res.err, res.out + res.err


# --------------------------------------------------------------------------- the M·K line

def test_mk_line_then_report(vaexp_main, tmp_path):
    out_root = tmp_path / "out"
    res = vaexp_main("train", "-m", "objective=miwae", "mk=4", "m=1,2,4", "sweep=line", *TINY, f"out_root={out_root}")
    assert res.code == 0, res.err
    no_traceback(res)
    sweep = out_root / "multirun" / "line"            # sweep=<name> names the directory
    assert "all 3 jobs finished" in res.out and f"vaexp report {sweep}" in res.out
    found = {config_of(j)["m"]: config_of(j)["k"] for j in jobs(sweep)}
    assert found == {1: 4, 2: 2, 4: 1}                 # k = mk / m
    for j in jobs(sweep):
        assert "mk=4" in j.name.split(",") and finished(j)
    res = vaexp_main("report", sweep)
    assert res.code == 0, res.err
    assert res.out.count("| miwae |") == 3
    assert (sweep / "report" / "nll_vs_m_mk4.png").is_file()


@pytest.mark.parametrize("args,words", [
    (["-m", "objective=miwae", "mk=6", "m=1,4"], ["mk=6 with m=4", "divisors of 6 (1, 2, 3, 6)", "sweep job"]),
    (["objective=miwae", "mk=8", "m=2", "k=3"], ["k=3 with mk=8 m=2", "mk/m = 4", "drop k=3"]),
    (["-m", "objective=miwae", "mk=8", "m=1,2", "k=4"], ["k=4 with mk=8 m=1", "mk/m = 8"]),
    (["mk=0"], ["mk=0", ">= 1"]),
    (["objective=iwae", "mk=8", "m=2"], ["objective=iwae with m=2", "miwae m=2 k=4"]),  # checks see k = mk/m
])
def test_mk_errors(args, words, vaexp_main, tmp_path):
    out_root = tmp_path / "out"
    res = vaexp_main("train", *args, *TINY, f"out_root={out_root}")
    assert res.code == 2
    for w in words:
        assert w in res.err, res.err
    assert not out_root.exists()


def test_mk_single_run_names_the_derived_k(vaexp_main, tmp_path):
    out_root = tmp_path / "out"
    res = vaexp_main("train", "objective=miwae", "mk=8", "m=2", "k=4", *TINY, f"out_root={out_root}")
    assert res.code == 0, res.err          # a k that agrees with mk/m is fine
    (run,) = (out_root / "train").iterdir()
    assert "_miwae_m2_k4_" in run.name and config_of(run)["k"] == 4 and config_of(run)["mk"] == 8


def test_cross_product_grid(vaexp_main, tmp_path):
    out_root = tmp_path / "out"
    res = vaexp_main("train", "-m", "objective=miwae", "m=1,2", "k=1,2", "sweep=grid", *TINY, f"out_root={out_root}")
    assert res.code == 0, res.err
    sweep = out_root / "multirun" / "grid"
    assert sorted((config_of(j)["m"], config_of(j)["k"]) for j in jobs(sweep)) == [(1, 1), (1, 2), (2, 1), (2, 2)]


def test_a_sweep_named_by_the_microsecond_is_one_directory(vaexp_main, tmp_path):
    """The jobs land where the callback checked and the summary looks: ${now} is the launch's."""
    sweeps = tmp_path / "sweeps"
    res = vaexp_main("train", "-m", "seed=0,1", *TINY, f"out_root={tmp_path / 'out'}",
                     f"hydra.sweep.dir={sweeps}/s" + "${now:%H-%M-%S-%f}")
    assert res.code == 0, res.err
    no_traceback(res)
    (sweep,) = sweeps.iterdir()
    assert [config_of(job)["seed"] for job in jobs(sweep)] == [0, 1]
    assert all(finished(job) for job in jobs(sweep))
    assert f"sweep {sweep}: all 2 jobs finished" in res.out, res.out + res.err

# --------------------------------------------------------------------------- failures, re-runs

def test_a_failing_job_does_not_stop_the_sweep(vaexp_main, tmp_path):
    out_root = tmp_path / "out"
    cmd = ["train", "-m", "sweep=f", *TINY, "batch_size=20,500", f"out_root={out_root}"]
    res = vaexp_main(*cmd)
    assert res.code == 1
    no_traceback(res)
    sweep = out_root / "multirun" / "f"
    good, bad = sorted(jobs(sweep), key=lambda j: "batch_size=500" in j.name)
    assert finished(good) and not finished(bad)
    assert (bad / "error.txt").read_text().splitlines()[0].startswith("batch_size=500: larger than the 100")
    assert f"sweep {sweep}: 1 of 2 jobs finished, 1 failed" in res.err
    assert f"failed: {bad.name}: batch_size=500" in res.err
    # the same command again: the finished job is reported, not retrained; the failed one is retried
    before = (good / "metrics.json").stat().st_mtime_ns
    res = vaexp_main(*cmd)
    assert res.code == 1
    assert "already finished" in res.out
    assert (good / "metrics.json").stat().st_mtime_ns == before
    assert (bad / "error.txt").is_file()


def test_an_unexpected_error_is_recorded_with_its_traceback(vaexp_main, tmp_path, monkeypatch):
    import vaexp.training.loop

    real = vaexp.training.loop.train

    def flaky(cfg, run_dir, stop=None):
        if cfg.k == 2:
            raise RuntimeError("boom in k=2")
        return real(cfg, run_dir)

    monkeypatch.setattr(vaexp.training.loop, "train", flaky)
    out_root = tmp_path / "out"
    res = vaexp_main("train", "-m", "k=1,2", "sweep=x", *TINY, f"out_root={out_root}")
    assert res.code == 1
    assert "Traceback" not in res.err and "RuntimeError: boom in k=2" in res.err
    bad = next(j for j in jobs(out_root / "multirun" / "x") if "k=2" in j.name.split(","))
    text = (bad / "error.txt").read_text()
    assert text.startswith("RuntimeError: boom in k=2") and "Traceback" in text and "flaky" in text
    good = next(j for j in jobs(out_root / "multirun" / "x") if "k=1" in j.name.split(","))
    assert finished(good)


def test_an_interrupted_sweep_resumes_when_run_again(vaexp_main, tmp_path, monkeypatch):
    out_root = tmp_path / "out"
    cmd = ["train", "-m", "k=1,2", "sweep=r", *TINY, f"out_root={out_root}"]
    monkeypatch.setenv("VAEXP_INTERRUPT_AT_STEP", "2")            # a deterministic Ctrl-C at step 2
    res = vaexp_main(*cmd)
    assert res.code == 130                                           # Ctrl-C stops the whole sweep
    sweep = out_root / "multirun" / "r"
    (first,) = jobs(sweep)
    assert (first / "checkpoint.pt").is_file() and not finished(first)
    monkeypatch.delenv("VAEXP_INTERRUPT_AT_STEP")
    res = vaexp_main(*cmd)
    assert res.code == 0, res.err
    assert f"resuming {first}: 0 of 1 epochs done, and 2 of the 5 steps of epoch 1; continuing epoch 1" in res.out
    assert all(finished(j) for j in jobs(sweep)) and len(jobs(sweep)) == 2


# --------------------------------------------------------------------------- presets

@pytest.fixture
def compose_train():
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from vaexp.cli.configs import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="vaexp.conf", version_base="1.3"):
        yield lambda *overrides: compose("train", overrides=list(overrides), return_hydra_config=True)
    GlobalHydra.instance().clear()


def test_iwae_table1_preset_is_burdas_grid(compose_train):
    from vaexp.cli.checks import validate_command
    from vaexp.schedule import epoch_learning_rates
    from vaexp.cli.sweep import sweep_jobs

    cfg = compose_train("experiment=iwae_table1")
    grid = sweep_jobs(cfg, "train")
    assert len(grid) == 12
    seen = set()
    for _, job in grid:
        validate_command(job)
        seen.add((job.model.name, job.objective.name, job.k))
        assert job.dataset.name == "mnist" and job.m == 1 and job.batch_size == 20 and job.eval.k == 5000
        assert job.estimator.name == "reparam" and len(epoch_learning_rates(job.schedule)) == 3280
        assert job.hydra.sweep.dir.endswith("multirun/iwae_table1")
    assert seen == {(m, o, k) for m in ("burda1", "burda2") for o in ("vae", "iwae") for k in (1, 5, 50)}
    # command-line values replace the preset's (here: seeds added, k narrowed)
    from omegaconf import open_dict, read_write

    with read_write(cfg), open_dict(cfg):
        cfg.hydra.overrides.task = ["experiment=iwae_table1", "seed=0,1", "k=50"]
    assert len(sweep_jobs(cfg, "train")) == 8


def test_every_job_and_the_sweeper_see_one_launch_time(compose_train):
    """${now:...} in the sweep directory is resolved once: the directories vaexp checks, plans and
    summarises are the ones the sweeper creates, however long the checks between take."""
    import time

    from omegaconf import open_dict, read_write

    from vaexp.cli.sweep import job_directory, sweep_jobs

    cfg = compose_train("hydra.sweep.dir=/tmp/vaexp-never-made/${now:%H-%M-%S-%f}")
    with read_write(cfg), open_dict(cfg):
        cfg.hydra.overrides.task = ["seed=0,1,2"]
    grid = sweep_jobs(cfg, "train")
    time.sleep(0.01)  # %f: any later resolution without the cache is another name
    dirs = {job_directory(job).parent for _, job in grid}
    assert dirs == {Path(str(cfg.hydra.sweep.dir))}, dirs
    assert [job.seed for _, job in grid] == [0, 1, 2]


def test_rainforth_preset_is_the_mk64_line(compose_train):
    from vaexp.cli.checks import validate_command, with_mk
    from vaexp.cli.sweep import sweep_jobs

    grid = sweep_jobs(compose_train("experiment=rainforth_mk64"), "train")
    assert len(grid) == 21
    seen = set()
    for _, job in grid:
        validate_command(job)
        job = with_mk(job)
        assert job.m * job.k == 64 and job.beta == 0.05 and job.model.name == "burda1"
        seen.add((job.objective.name, job.m))
    assert seen == {(o, m) for o in ("miwae", "piwae", "ciwae") for m in (1, 2, 4, 8, 16, 32, 64)}


def test_preset_runs_as_a_sweep_and_needs_m(vaexp_main, tmp_path):
    out_root = tmp_path / "out"
    res = vaexp_main("train", "experiment=rainforth_mk64", *TINY, f"out_root={out_root}")
    assert res.code == 2 and "has no -m" in res.err and "objective=..., m=..." in res.err
    assert not out_root.exists()
    res = vaexp_main("train", "-m", "experiment=rainforth_mk64", "objective=ciwae", "m=1,64", *TINY,
                     f"out_root={out_root}")
    assert res.code == 0, res.err
    found = {config_of(j)["m"]: (config_of(j)["k"], config_of(j)["beta"]) for j in jobs(out_root / "multirun" / "rainforth_mk64")}
    assert found == {1: (64, 0.05), 64: (1, 0.05)}
    # one grid point of a preset, picked on the command line, runs without -m
    res = vaexp_main("train", "experiment=rainforth_mk64", "objective=miwae", "m=32", *TINY, f"out_root={out_root}")
    assert res.code == 0, res.err
    assert "miwae m=32 k=2" in res.out


# --------------------------------------------------------------------------- launchers

def _launcher_sweep(cli, tmp_path, *launcher):
    out_root = tmp_path / "out"
    res = cli("train", "-m", *launcher, "sweep=l", *TINY, "batch_size=20,500", f"out_root={out_root}")
    assert res.code == 1, res.out + res.err
    no_traceback(res)
    sweep = out_root / "multirun" / "l"
    good, bad = sorted(jobs(sweep), key=lambda j: "batch_size=500" in j.name)
    assert finished(good) and (good / "checkpoint.pt").is_file() and list(good.glob("events.out.tfevents.*"))
    assert (bad / "error.txt").read_text().startswith("batch_size=500")
    assert "1 of 2 jobs finished, 1 failed" in res.err
    return sweep


def test_joblib_launcher(cli, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    _launcher_sweep(cli, tmp_path, "hydra/launcher=parallel", "hydra.launcher.n_jobs=2")


def test_submitit_local_launcher(cli, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = _launcher_sweep(cli, tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10")
    assert list((sweep / ".submitit").iterdir())       # submitit's own logs, kept out of the jobs


def test_slurm_preset(compose_train):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_train("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=600")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.timeout_min, launcher.gpus_per_node) == ("gpu", 600, 1)
    assert launcher.max_num_timeout > 0 and launcher.submitit_folder.endswith(".submitit/%j")


def test_unknown_launcher(cli, tmp_path):
    res = cli("train", "-m", "hydra/launcher=foo", "k=1,2", *TINY, f"out_root={tmp_path / 'out'}")
    assert res.code != 0
    no_traceback(res)
    assert "hydra/launcher/foo" in res.err and "basic" in res.err and "slurm" in res.err and "parallel" in res.err
    assert not (tmp_path / "out").exists()


def test_missing_launcher_plugin_says_what_to_install(vaexp_main, monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("hydra_plugins.hydra_submitit") else real(name, *a))
    res = vaexp_main("train", "-m", "hydra/launcher=slurm", "k=1,2", *TINY, f"out_root={tmp_path / 'out'}")
    assert res.code == 2
    assert 'pip install "vaexp[slurm]"' in res.err and "hydra-submitit-launcher" in res.err


def test_slurm_launcher_without_srun_is_refused_before_any_directory(vaexp_main, monkeypatch, tmp_path):
    """submitit would fail with a traceback after Hydra made the sweep directory."""
    import shutil

    real = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **kw: None if name == "srun" else real(name, *a, **kw))
    for launcher in ("slurm", "submitit_slurm"):
        res = vaexp_main("train", "-m", f"hydra/launcher={launcher}", "k=1,2", *TINY, f"out_root={tmp_path / 'out'}")
        assert res.code == 2, res.err
        no_traceback(res)
        assert f"hydra/launcher={launcher}" in res.err and "srun" in res.err and "hydra/launcher=parallel" in res.err
        assert not (tmp_path / "out").exists()


def test_the_summary_finds_jobs_wherever_hydra_put_them(vaexp_main, tmp_path):
    """sweep=a,b puts each job in its own sweep directory, hydra.sweep.subdir= names the jobs
    differently: the summary (and a stack=true plan) must look where Hydra ran them."""
    out = tmp_path / "out"
    res = vaexp_main("train", "-m", *TINY, "sweep=sa,sb", f"out_root={out}")
    assert res.code == 0, res.err
    assert "all 2 jobs finished" in res.out and f"vaexp report {out}/multirun/sa {out}/multirun/sb" in res.out
    assert len(jobs(out / "multirun" / "sa")) == len(jobs(out / "multirun" / "sb")) == 1
    # seeds other than the primary config's 0: each job's own seed names its directory
    res = vaexp_main("train", "-m", *TINY, "stack=true", "seed=1,2", f"hydra.sweep.dir={tmp_path / 'own'}",
                     "hydra.sweep.subdir=seed${seed}")
    assert res.code == 0, res.err
    assert "all 2 jobs finished" in res.out and "stacked" in res.out + res.err
    assert finished(tmp_path / "own" / "seed1") and finished(tmp_path / "own" / "seed2")
    res = vaexp_main("train", "-m", *TINY, "seed=1,2", f"hydra.sweep.dir={tmp_path / 'num'}",
                     "hydra.sweep.subdir=${hydra.job.num}")   # Hydra's own naming: what the launcher numbers
    assert res.code == 0 and "all 2 jobs finished" in res.out, res.err
    assert finished(tmp_path / "num" / "0") and finished(tmp_path / "num" / "1")


def test_a_sweep_over_presets_is_refused(vaexp_main, tmp_path):
    out = tmp_path / "out"
    res = vaexp_main("train", "-m", *TINY, "experiment=iwae_table1,rainforth_mk64", f"out_root={out}")
    assert res.code == 2 and "a sweep over presets runs none of their grids" in res.err, res.err
    no_traceback(res)
    assert not out.exists()


def test_snr_sweeps_finish_and_keep_each_run_apart(vaexp_main, tmp_path):
    """snr jobs are judged by their snr.csv (not as training runs), and run=A,B are two folders."""
    out = tmp_path / "out"
    for name in ("A", "B"):
        assert vaexp_main("train", *TINY, f"hydra.run.dir={tmp_path / name}").code == 0
    grid = ["k=[2]", "m=[1]", "draws=10", "progress=false", f"out_root={out}"]
    res = vaexp_main("snr", "-m", "seed=0,1", *grid)
    assert res.code == 0 and "all 2 jobs finished" in res.out, res.out + res.err
    res = vaexp_main("snr", "-m", f"run={tmp_path / 'A'},{tmp_path / 'B'}", *grid)
    assert res.code == 0 and "all 2 jobs finished" in res.out, res.out + res.err
    csvs = sorted(out.rglob("snr.csv"))
    assert len(csvs) == 4 and len({p.parent for p in csvs}) == 4
    assert {p.parent.parent.name.split("-")[0] for p in csvs if p.parent.parent.name[:2] in ("A-", "B-")} == {"A", "B"}
