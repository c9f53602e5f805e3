"""`vaexp snr`'s output directory is a transaction like a train run's (vaexp.snr.check_out_dir):
another command's output there (a train run, one `vaexp eval` added to, a sweep) or a measurement
with other settings is refused in one line before anything is written - Hydra's .hydra/ record
included - leaving every file as it was; the same measurement, finished, is reported (as `vaexp
train` reports a finished run); the results are written atomically and only once measured, so an
interruption or a full disk leaves the directory as it was.

Runs are tiny: the synthetic data, a 4-unit model, one epoch; snr with R = 3 draws.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
from pathlib import Path
from typing import Dict

import pytest
import yaml

import vaexp.snr
from conftest import TINY_BURDA1, TINY_RUN, run_cli
from vaexp import rundir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = TINY_RUN + TINY_BURDA1
SNR = ["k=[1,2]", "m=[1]", "draws=3", "progress=false"]


def hashes(root: Path) -> Dict[str, str]:
    """Every file under root (hidden ones too, .hydra/ included) -> sha256 of its bytes; the lock
    file by name only (it holds the last holder's pid: state, not a result)."""
    root = Path(root)
    return {str(p.relative_to(root)): ("lock" if p.name == rundir.LOCK else hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_line_error(res, code: int, *words: str) -> str:
    assert res.code == code, (res.code, res.out, res.err)
    assert "Traceback" not in res.out + res.err, res.err
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("vaexp: "), res.err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture
def measured(run_copy, tmp_path, vaexp_main):
    """A finished snr measurement of run_copy in tmp_path/snr1."""
    out = tmp_path / "snr1"
    res = vaexp_main("snr", f"run={run_copy}", *SNR, f"hydra.run.dir={out}")
    assert res.code == 0, res.err
    assert all((out / name).is_file() for name in vaexp.snr.RESULT_FILES)
    return out


def test_snr_into_a_train_runs_directory_is_refused_and_leaves_it_unchanged(run_copy, vaexp_main):
    """The audit's case: `vaexp snr run=SN hydra.run.dir=SN` replaced the run's config.yaml and
    .hydra/ with snr's, and `vaexp eval SN` then failed. Refused like `vaexp train` into another
    command's directory (RunDirTaken), before Hydra writes .hydra/, nothing changed."""
    before = hashes(run_copy)
    res = vaexp_main("snr", f"run={run_copy}", *SNR, f"hydra.run.dir={run_copy}")
    one_line_error(res, 2, f"{run_copy} holds the output of another command", "use a new output directory")
    assert hashes(run_copy) == before
    assert vaexp_main("eval", str(run_copy), "progress=false").code == 0  # still a run


def test_snr_into_another_commands_directory_is_refused_in_a_real_process(run_copy, tmp_path, data_dir):
    """The exit status and stderr of a real `vaexp snr`; then `vaexp eval` of the run works."""
    rundir.atomic_write_text(run_copy / "notes.txt", "mine\n")
    before = hashes(run_copy)
    res = run_cli(["snr", f"run={run_copy}", *SNR, f"hydra.run.dir={run_copy}"], tmp_path, data_dir)
    one_line_error(res, 2, "holds the output of another command")
    assert res.out == ""
    assert hashes(run_copy) == before


@pytest.mark.parametrize("kind", ["config.yaml of train", "metrics.json only", "hydra record of train",
                                  "a sweep directory", "foreign config.yaml"])
def test_every_kind_of_other_output_is_refused(kind, run_copy, tmp_path, vaexp_main):
    d = tmp_path / "other"
    d.mkdir()
    if kind == "config.yaml of train":
        shutil.copy(run_copy / rundir.CONFIG, d / rundir.CONFIG)
    elif kind == "metrics.json only":
        shutil.copy(run_copy / rundir.METRICS, d / rundir.METRICS)
    elif kind == "hydra record of train":  # a failed train sweep job: .hydra/ and error.txt
        shutil.copytree(run_copy / rundir.HYDRA_DIR, d / rundir.HYDRA_DIR)
        (d / rundir.ERROR_FILE).write_text("failed\n")
    elif kind == "a sweep directory":
        (d / rundir.MULTIRUN_RECORD).write_text("hydra: {}\n")
    else:  # hydra.run.dir=. in a folder with a config.yaml of the user's
        (d / rundir.CONFIG).write_text("name: my project\n")
    before = hashes(d)
    one_line_error(vaexp_main("snr", f"run={run_copy}", *SNR, f"hydra.run.dir={d}"), 2,
                   f"{d} holds the output of another command")
    assert hashes(d) == before


def test_an_snr_sweep_over_a_train_sweeps_directories_is_refused_before_anything_is_written(tmp_path, vaexp_main):
    """Jobs named by number: the snr sweep's job 0 is the train sweep's job 0. Refused as a whole
    before Hydra rewrites that run's .hydra/ (in a sweep Hydra writes it before the job runs)."""
    where = [f"hydra.sweep.dir={tmp_path / 'sw'}", "hydra.sweep.subdir=${hydra.job.num}"]
    assert vaexp_main("train", "-m", *TINY, "seed=0,1", *where).code == 0
    before = hashes(tmp_path / "sw")
    res = vaexp_main("snr", "-m", f"run={tmp_path / 'sw' / '0'}", *SNR, "seed=0,1", *where)
    one_line_error(res, 2, "holds the output of another command", "nothing was run")
    assert hashes(tmp_path / "sw") == before


def test_a_rerun_with_other_settings_is_refused_before_anything_is_written(measured, run_copy, vaexp_main,
                                                                           monkeypatch):
    """The audit's second case: re-run with new settings and stopped by SIGTERM while measuring,
    it said "what this command added is removed" but had replaced config.yaml and snr.csv while
    snr.txt and snr.png were the old run's. Now refused before measuring: nothing changes."""
    calls = []

    def terminated(*args, **kwargs):
        calls.append(1)
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(vaexp.snr, "measure", terminated)
    before = hashes(measured)
    res = vaexp_main("snr", f"run={run_copy}", "k=[1,4]", "m=[1]", "draws=3", "progress=false",
                     f"hydra.run.dir={measured}")
    one_line_error(res, 2, f"{measured} already holds an snr measurement with other settings",
                   "k=[1, 4] (saved: [1, 2])", "use a new output directory")
    assert not calls
    assert hashes(measured) == before


def test_an_interrupted_measurement_leaves_the_directory_as_it_was(measured, run_copy, vaexp_main, monkeypatch):
    """A measurement with its own settings whose result is incomplete (no snr.csv, as a killed or
    failed sweep job leaves it) is measured again; stopped by SIGTERM, nothing it wrote is left:
    every result is written only once measured."""
    (measured / vaexp.snr.CSV_NAME).unlink()
    before = hashes(measured)
    real = vaexp.snr.measure

    def terminated(*args, **kwargs):
        out = real(*args, **kwargs)
        signal.raise_signal(signal.SIGTERM)
        return out

    monkeypatch.setattr(vaexp.snr, "measure", terminated)
    res = vaexp_main("snr", f"run={run_copy}", *SNR, f"hydra.run.dir={measured}")
    one_line_error(res, 130, "stopped by SIGTERM", f"what this command added to {measured} is removed")
    after = hashes(measured)
    assert {k: v for k, v in after.items() if not k.startswith(".hydra/") and k != "snr.log"} == \
        {k: v for k, v in before.items() if not k.startswith(".hydra/") and k != "snr.log"}
    monkeypatch.setattr(vaexp.snr, "measure", real)
    assert vaexp_main("snr", f"run={run_copy}", *SNR, f"hydra.run.dir={measured}").code == 0
    assert all((measured / name).is_file() for name in vaexp.snr.RESULT_FILES)


def test_sigterm_while_writing_the_results_of_a_new_directory_leaves_nothing(run_copy, tmp_path, vaexp_main,
                                                                             monkeypatch):
    def terminated(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(vaexp.snr, "write_tensorboard", terminated)  # between snr.png and snr.csv
    out = tmp_path / "fresh" / "snr"
    res = vaexp_main("snr", f"run={run_copy}", *SNR, f"hydra.run.dir={out}")
    one_line_error(res, 130, "stopped by SIGTERM", "nothing was kept")
    assert not (tmp_path / "fresh").exists()


def test_the_same_measurement_finished_is_reported_not_measured_again(measured, run_copy, vaexp_main, monkeypatch,
                                                                      tmp_path):
    monkeypatch.setattr(vaexp.snr, "measure", lambda *a, **k: pytest.fail("measured again"))
    results = {name: (measured / name).read_bytes() for name in vaexp.snr.RESULT_FILES}
    events = sorted(p.name for p in measured.glob("events.out.tfevents.*"))
    monkeypatch.chdir(tmp_path)  # run= named another way (relative), and another device setting: the same
    res = vaexp_main("snr", f"run={os.path.relpath(run_copy)}", *SNR, "device=cpu", f"hydra.run.dir={measured}")
    assert res.code == 0, res.err
    assert f"{measured} already holds this measurement; its results:" in res.out
    assert (measured / "snr.txt").read_text().strip() in res.out
    assert {name: (measured / name).read_bytes() for name in vaexp.snr.RESULT_FILES} == results
    assert sorted(p.name for p in measured.glob("events.out.tfevents.*")) == events


def test_a_run_trained_on_since_it_was_measured_is_not_the_same_measurement(measured, run_copy, vaexp_main):
    assert vaexp_main("train", f"resume={run_copy}", "schedule.epochs=2", "progress=false").code == 0
    before = hashes(measured)
    res = vaexp_main("snr", f"run={run_copy}", *SNR, f"hydra.run.dir={measured}")
    one_line_error(res, 2, "already holds an snr measurement with other settings",
                   "checkpoint.epoch=2 (saved: 1)", "is not at the checkpoint it measured")
    assert hashes(measured) == before
    assert yaml.safe_load((measured / rundir.CONFIG).read_text())["checkpoint"] == {"epoch": 1, "global_step": 5}


def test_snr_results_are_written_atomically(measured, run_copy, vaexp_main, monkeypatch):
    """A full disk while snr.txt is written (it was a plain write_text) keeps the old snr.txt
    whole and leaves no temp file; the command says so in one line."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name a file descriptor's file")
    (measured / vaexp.snr.CSV_NAME).unlink()  # an unfinished result: measured again
    old_txt = (measured / "snr.txt").read_bytes()
    real = os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".snr.txt.tmp-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    res = vaexp_main("snr", f"run={run_copy}", *SNR, f"hydra.run.dir={measured}")
    one_line_error(res, 2, "no space left", "snr.txt")
    assert (measured / "snr.txt").read_bytes() == old_txt
    assert not [p.name for p in measured.iterdir() if ".tmp-" in p.name]
    assert not (measured / vaexp.snr.CSV_NAME).exists()


def test_write_csv_and_plot_write_atomically(tmp_path):
    rows = [vaexp.snr.Row(vaexp.snr.ALL, vaexp.snr.THETA, 1, k, 3, 1.0 + k, 2.0, 10, 0) for k in (1, 2)]
    vaexp.snr.write_csv(tmp_path / "snr.csv", rows)
    assert vaexp.snr.read_csv(tmp_path / "snr.csv")[1].mean == 3.0
    vaexp.snr.plot(tmp_path / "snr.png", rows, 3)
    assert (tmp_path / "snr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snr.csv", "snr.png"]
