"""Issue 9: nothing lost, nothing silently wrong. One test (or a few) per numbered case of the
issue - data loss (1-4), silently wrong results (5-11), raw tracebacks (12-17) - each asserting the
exit status, the one-line message, that no traceback is printed, and the bytes of every file that
must survive; then unit checks of the run-directory transaction (vaexp.rundir).

Runs are tiny (synthetic data, a 4-unit model, one epoch). A full disk is a monkeypatched fsync
(and a real small tmpfs where `unshare` may mount one); memory exhaustion a real absurd k for
training, and a patched allocation failure for the evaluation and snr.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Dict

import pytest
import torch

import vaexp.evaluate
import vaexp.snr
import vaexp.training.loop
import vaexp.training.step
from conftest import TINY_BURDA1, TINY_RUN, cli_env
from vaexp import rundir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = TINY_RUN + TINY_BURDA1
LOCK_STATE = {rundir.LOCK}  # the lock file holds the last holder's pid: state, not a result


# --------------------------------------------------------------------------- helpers

def tree(root: Path, skip=LOCK_STATE) -> Dict[str, bytes]:
    """Every file under root (hidden ones too) -> its bytes."""
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in skip}


def assert_one_line_error(res, code: int = 2, *words: str) -> str:
    """Exit status `code`, no traceback, exactly one `vaexp:` error line holding every word."""
    assert res.code == code, (res.code, res.out, res.err)
    assert "Traceback" not in res.out + res.err, res.err
    errors = [ln for ln in res.err.splitlines() if ln.startswith("vaexp: ") and not ln.startswith("vaexp: warning")]
    assert len(errors) == 1, res.err
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]


def test_an_error_in_a_message_is_one_line_and_named_unless_it_is_vaexps_own():
    from vaexp.data.base import DataError, SourceFailed
    from vaexp.errors import VaexpError, one_line

    assert one_line(OSError("cannot\n  read   it")) == "OSError: cannot read it"
    assert one_line(ValueError()) == "ValueError"
    for own in (VaexpError, DataError, SourceFailed):  # already written for the user
        assert one_line(own("dataset.path=x: no such file\nfix it")) == "dataset.path=x: no such file fix it"
    assert one_line(VaexpError("")) == "VaexpError"
    assert one_line(OSError("x" * 300), 20) == "OSError: xxxxxxxx..."


def metrics(run: Path) -> dict:
    return json.loads((run / rundir.METRICS).read_text())


def fail_fsync(monkeypatch, name: str, nth: int = 1, before=None):
    """The nth fsync of a temp file of `name` (what rundir writes) fails with ENOSPC, as a full
    disk does; `before()` runs just before it fails."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name a file descriptor's file")
    real, seen = os.fsync, {"n": 0}

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{name}.tmp-"):
            seen["n"] += 1
            if seen["n"] >= nth:
                if before is not None:
                    before()
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def temp_files(d: Path):
    return sorted(p.name for p in Path(d).iterdir() if ".tmp-" in p.name)


def can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def in_namespace(script: str, data_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a bash script as root of a new user and mount namespace (it may mount tmpfs)."""
    env = cli_env(data_dir, V=sys.executable)
    return subprocess.run(["unshare", "-rm", "bash", "-c", script], capture_output=True, text=True, env=env,
                          timeout=timeout)


needs_unshare = pytest.mark.skipif(not can_unshare(), reason="needs `unshare -rm` (user namespaces) to mount")


# =========================================================================== data loss

@pytest.mark.parametrize("fault", ["missing data", "nan in epoch 1"])
def test_case01_a_failed_fresh_run_removes_only_what_it_created(fault, vaexp_main, tmp_path):
    work = tmp_path / "work"  # hydra.run.dir=<a folder with the user's own files>
    (work / ".hydra").mkdir(parents=True)
    (work / ".hydra" / "mine.yaml").write_text("a: 1\n")
    (work / "train.log").write_text("my own log\n")
    (work / "events.out.tfevents.1.mine").write_bytes(b"my own events")
    (work / "notes.txt").write_text("notes")
    before = tree(work)
    args = {"missing data": ["dataset=fashion_mnist", f"dataset.path={tmp_path / 'nowhere'}", "progress=false"],
            "nan in epoch 1": [*TINY, "schedule.epochs=2", "schedule.lr=1e30"]}[fault]
    word = {"missing data": "dataset.path=", "nan in epoch 1": "nan"}[fault]
    res = vaexp_main("train", *args, f"hydra.run.dir={work}")
    assert_one_line_error(res, 2, word, f"what this command added to {work} is removed")
    assert tree(work, skip=()) == before  # Hydra's .hydra/*.yaml, config.yaml, events, the lock: all gone
    # ... and in a fresh directory: nothing at all is left, not even out_root
    out_root = tmp_path / "out"
    res = vaexp_main("train", *args, f"out_root={out_root}")
    assert_one_line_error(res, 2, word, "nothing was kept")
    assert not out_root.exists()


@pytest.mark.parametrize("damage", ['{"train": {"bound": -8', "[1, 2]"], ids=["not-json", "wrong-shape"])
def test_case02_eval_moves_an_unreadable_metrics_json_aside(damage, run_copy, vaexp_main):
    run = run_copy
    (run / "metrics.json").write_text(damage)
    before = tree(run)
    res = vaexp_main("eval", run, "progress=false")
    assert res.code == 0, res.err
    assert "Traceback" not in res.err and "was unreadable" in res.err and "metrics.json.corrupt-" in res.err
    (aside,) = run.glob("metrics.json.corrupt-*")
    assert aside.read_text() == damage                                      # never silently dropped
    after = tree(run)
    for name, data in before.items():  # every file is kept as it was; the latest copies are replaced
        if name not in ("metrics.json", "test_log_px.pt"):
            assert after[name] == data, name
    assert after["test_log_px.0.pt"] == before["test_log_px.0.pt"]         # the training evaluation's values
    new = metrics(run)
    assert [e["per_example"] for e in new["evals"]] == ["test_log_px.1.pt"]
    assert after["test_log_px.1.pt"] == after["test_log_px.pt"]


def _start(args, cwd: Path, data_dir: Path, out: Path) -> subprocess.Popen:
    with open(out / "a.out", "w") as so, open(out / "a.err", "w") as se:
        return subprocess.Popen([sys.executable, "-m", "vaexp", *args], cwd=str(cwd), stdout=so, stderr=se,
                                env=cli_env(data_dir))


def test_case03_a_second_process_on_a_run_dir_fails_at_once(tmp_path, data_dir, cli, vaexp_main):
    run = tmp_path / "run"
    proc = _start(["train", *TINY, "schedule.epochs=2000", f"hydra.run.dir={run}"], tmp_path, data_dir, tmp_path)
    try:
        deadline = time.monotonic() + 180
        while not (run / "checkpoint.pt").exists():
            assert proc.poll() is None, (tmp_path / "a.err").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        record = {n: (run / n).read_bytes() for n in ("config.yaml", ".hydra/overrides.yaml", ".hydra/config.yaml")}
        for args in (["train", *TINY, "k=3", f"hydra.run.dir={run}"],     # other settings
                     ["train", f"resume={run}", "progress=false"],             # the same run
                     ["eval", run, "progress=false"]):
            t0 = time.monotonic()
            res = cli(*args)
            assert_one_line_error(res, 2, f"{run} is in use by another vaexp process (pid {proc.pid})")
            assert time.monotonic() - t0 < 60  # at once: no waiting for the lock
        assert {n: (run / n).read_bytes() for n in record} == record
        assert not list(run.glob("eval.log")) and not list(run.glob("config.*.yaml"))
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    res = vaexp_main("eval", run, "progress=false")  # the holder is gone: the lock is free again
    assert res.code == 0, res.err


def test_case04_full_disk_during_the_final_evaluation(vaexp_main, tmp_path, monkeypatch):
    run = tmp_path / "fresh"
    fail_fsync(monkeypatch, "metrics.json", nth=2)  # the 1st metrics.json write records the training
    res = vaexp_main("train", *TINY, f"hydra.run.dir={run}")
    assert_one_line_error(res, 2, "no space left", f"{run / 'metrics.json'}", "test NLL", f"vaexp eval {run}",
                          "training is complete and checkpointed")
    assert temp_files(run) == []
    saved = metrics(run)
    assert saved["run"]["state"] == "trained" and saved["train"]["steps"] == 5 and "evals" not in saved
    assert not (run / "test_log_px.0.pt").exists()  # not recorded, so not left looking like a result
    assert rundir.load_checkpoint(run)["state"]["epoch"] == 1
    monkeypatch.undo()
    res = vaexp_main("eval", run, "progress=false")  # the printed advice, once there is space again
    assert res.code == 0, res.err
    after = metrics(run)
    assert after["train"] == saved["train"] and rundir.judge(after, 1)[0] == "finished"


def test_case04_full_disk_during_a_checkpoint_keeps_the_previous_one(vaexp_main, tmp_path, monkeypatch):
    run = tmp_path / "run"
    kept = {}
    fail_fsync(monkeypatch, "checkpoint.pt", nth=2, before=lambda: kept.update(b=(run / "checkpoint.pt").read_bytes()))
    res = vaexp_main("train", *TINY, "schedule.epochs=3", f"hydra.run.dir={run}")
    assert_one_line_error(res, 2, "no space left", str(run / "checkpoint.pt"), f"resume={run}")
    assert temp_files(run) == []
    assert (run / "checkpoint.pt").read_bytes() == kept["b"]  # the good file was not replaced
    assert rundir.load_checkpoint(run)["state"]["epoch"] == 1
    monkeypatch.undo()
    res = vaexp_main("train", f"resume={run}", "progress=false")
    assert res.code == 0, res.err
    assert rundir.load_checkpoint(run)["state"]["epoch"] == 3


def test_case04_stale_temp_files_of_a_killed_write_are_removed_at_the_next_start(run_copy, vaexp_main):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs, as after SIGKILL
    stale = [run_copy / f".checkpoint.pt.tmp-{dead.pid}", run_copy / f".metrics.json.tmp-{dead.pid}"]
    stale[0].write_bytes(os.urandom(5 << 20))
    stale[1].write_text('{"half": ')
    res = vaexp_main("eval", run_copy, "progress=false")
    assert res.code == 0, res.err
    assert not any(p.exists() for p in stale) and temp_files(run_copy) == []


@needs_unshare
def test_case04_a_real_full_disk_then_resume(tmp_path, data_dir):
    """A 3 MB tmpfs filled up while the run trains: whichever write hits it (checkpoint, events,
    metrics), one line, exit 2, no temp file, a loadable checkpoint; after freeing space the
    run resumes to the end."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = " ".join(TINY)
    script = f"""
        mount -t tmpfs -o size=3m tmpfs {mnt} || exit 99
        $V -m vaexp train {args} schedule.epochs=2000 hydra.run.dir={mnt}/run > {tmp_path}/out 2> {tmp_path}/err &
        P=$!
        while [ ! -f {mnt}/run/checkpoint.pt ]; do sleep 0.05; done
        dd if=/dev/zero of={mnt}/fill bs=4k 2>/dev/null
        wait $P; echo "rc=$?"
        ls -a {mnt}/run
        E=$($V -c "from vaexp import rundir; print(rundir.load_checkpoint('{mnt}/run')['state']['epoch'])")
        echo "epoch $E"
        rm {mnt}/fill
        $V -m vaexp train resume={mnt}/run schedule.epochs=$((E + 2)) progress=false > /dev/null 2> {tmp_path}/err2
        echo "rc2=$?"
        F=$($V -c "from vaexp import rundir; print(rundir.load_checkpoint('{mnt}/run')['state']['epoch'])")
        [ "$F" = "$((E + 2))" ] && echo "final ok"
    """
    proc = in_namespace(script, data_dir)
    if "rc=" not in proc.stdout:
        pytest.skip(f"could not mount a tmpfs here: {proc.stderr[-300:]}")
    err = (tmp_path / "err").read_text()
    assert "rc=2" in proc.stdout, (proc.stdout, err)
    assert "Traceback" not in err and "no space left" in err, err
    assert len([ln for ln in err.splitlines() if ln.startswith("vaexp: ") and "warning" not in ln]) == 1, err
    assert ".tmp-" not in proc.stdout
    assert "epoch " in proc.stdout and "rc2=0" in proc.stdout, (proc.stdout, (tmp_path / "err2").read_text())
    assert "final ok" in proc.stdout, proc.stdout


# =========================================================================== silently wrong results

def test_case05_report_groups_by_the_stored_evaluation_and_counts_copies_once(trained, tmp_path, vaexp_main):
    sweep = tmp_path / "s"
    shutil.copytree(trained, sweep / "a")
    shutil.copytree(trained, sweep / "a-copy")  # the same run twice (same settings and seed)
    res = vaexp_main("report", sweep, "plots=false")
    assert res.code == 0, res.err
    assert "1 finished run(s) in 1 setting(s), 1 duplicate(s) counted once" in res.err
    assert "Duplicates (1), counted once:" in res.out and "`a-copy`: same settings and seed as `a`" in res.out
    assert "± 0.00" not in res.out
    rows = {r["run"]: r for r in _csv(sweep / "report" / "runs.csv")}
    assert rows["a-copy"]["status"] == "duplicate" and rows["a"]["status"] == "finished"
    # re-evaluate the copy with eval.k=5: it is now another evaluation, grouped and labelled by it
    assert vaexp_main("eval", sweep / "a-copy", "eval.k=5", "progress=false").code == 0
    res = vaexp_main("report", sweep, "plots=false")
    assert res.code == 0, res.err
    summary = _csv(sweep / "report" / "summary.csv")
    assert sorted((r["eval_k"], r["n_seeds"]) for r in summary) == [("10", "1"), ("5", "1")]
    assert "duplicate" not in res.err


def test_case05_report_uses_the_evaluation_not_config_yaml(tmp_path, vaexp_main):
    from test_report import evaluation, fake_run

    sweep = tmp_path / "s"
    fake_run(sweep, "seed0", seed=0, evals=[evaluation(85.0, 0, settings={"k": 50})])
    fake_run(sweep, "seed1", seed=1, evals=[evaluation(86.0, 1, settings={"k": 50})])
    # seed 2 was re-evaluated with eval.k=1 after training: config.yaml still says eval.k=5000
    fake_run(sweep, "seed2", seed=2, evals=[evaluation(87.0, 2, settings={"k": 50}), evaluation(95.0, 2, settings={"k": 1})])
    res = vaexp_main("report", sweep, "plots=false")
    assert res.code == 0, res.err
    summary = {r["eval_k"]: r for r in _csv(sweep / "report" / "summary.csv")}
    assert set(summary) == {"50", "1"}
    assert summary["50"]["n_seeds"] == "2" and float(summary["50"]["test_nll_mean"]) == 85.5
    assert summary["1"]["n_seeds"] == "1" and float(summary["1"]["test_nll_mean"]) == 95.0
    assert "K = 1, 50" in res.out  # the table says which K each number used


def _csv(path: Path):
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def test_case06_an_extended_run_that_diverged_is_not_finished(trained, tmp_path, vaexp_main, monkeypatch):
    sweep = tmp_path / "s"
    shutil.copytree(trained, sweep / "good")
    run = sweep / "extended"
    shutil.copytree(trained, run)
    stale_nll = metrics(run)["test"]["nll"]
    real_step, calls = vaexp.training.step.train_step, []

    def nan_from_step_3(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls.append(1)
        return torch.full_like(out, float("nan")) if len(calls) >= 3 else out

    monkeypatch.setattr(vaexp.training.step, "train_step", nan_from_step_3)
    res = vaexp_main("train", f"resume={run}", "schedule.epochs=3", "progress=false")
    assert_one_line_error(res, 2, "nan", "schedule.lr")
    record = metrics(run)["run"]
    assert record["state"] == "diverged" and record["epoch"] == 1 and record["epochs"] == 3
    monkeypatch.undo()
    res = vaexp_main("report", sweep, "plots=false")
    assert res.code == 0, res.err
    rows = {r["run"]: r for r in _csv(sweep / "report" / "runs.csv")}
    assert rows["extended"]["status"] == "diverged" and rows["extended"]["test_nll"] == ""
    assert rows["good"]["status"] == "finished"
    assert "- `extended`: diverged: training bound became nan" in res.out
    assert "1 finished run(s) in 1 setting(s), 1 not finished" in res.err  # its stale NLL is not in the table
    assert metrics(run)["test"]["nll"] == stale_nll  # (it is kept in metrics.json, as what it is)


def test_case06_an_extension_in_progress_and_a_changed_length_are_not_finished(trained, tmp_path, vaexp_main,
                                                                                monkeypatch):
    from test_report import evaluation, fake_run

    sweep = tmp_path / "s"
    shutil.copytree(trained, sweep / "good")
    run = sweep / "extending"
    shutil.copytree(trained, run)
    monkeypatch.setenv("VAEXP_INTERRUPT_AT_STEP", "7")  # killed (here: interrupted) while training on
    res = vaexp_main("train", f"resume={run}", "schedule.epochs=3", "progress=false")
    assert res.code == 130, res.err
    monkeypatch.delenv("VAEXP_INTERRUPT_AT_STEP")
    assert metrics(run)["run"]["state"] == "training"
    # evaluated at epoch 1093, but config.yaml now asks for the whole 3280 (its length changed)
    fake_run(sweep, "short", seed=5, evals=[evaluation(80.0, 5, epoch=1093, global_step=100)])
    res = vaexp_main("report", sweep, "plots=false")
    assert res.code == 0, res.err
    rows = {r["run"]: r for r in _csv(sweep / "report" / "runs.csv")}
    assert rows["extending"]["status"] == "unfinished" and "training went on" in rows["extending"]["detail"]
    assert "checkpoint at epoch 1/3, step 7" in rows["extending"]["detail"]
    assert rows["short"]["status"] == "unfinished" and "epoch 1093 of 3280" in rows["short"]["detail"]
    assert rows["good"]["status"] == "finished"


def test_case07_an_explicit_dataset_path_wins_over_the_cache(tmp_path, data_dir, vaexp_main, monkeypatch):
    from test_data import fake_pixels, write_idx_dir
    from vaexp.data import base, mnist

    a = write_idx_dir(tmp_path / "a", fake_pixels(140, 1), fake_pixels(30, 2))
    # a's images as the standard files (only those fill the cache from a path)
    monkeypatch.setattr(mnist, "STANDARD_SIZES", (140, 30))
    monkeypatch.setitem(mnist.STANDARD_SHA256, "mnist", base.digests({"train": fake_pixels(140, 1),
                                                                       "test": fake_pixels(30, 2)}))
    b = write_idx_dir(tmp_path / "b", fake_pixels(140, 3), fake_pixels(25, 4))
    args = ["dataset=mnist", "dataset.n_valid=20", "schedule=quick", "schedule.epochs=1", "eval.k=10",
            "eval.au_samples=4", "progress=false", *TINY_BURDA1]
    assert vaexp_main("train", *args, f"dataset.path={a}", f"hydra.run.dir={tmp_path / 'r1'}").code == 0
    assert (data_dir / "mnist.pt").is_file()  # a cache now exists (of a's images)
    res = vaexp_main("train", *args, f"dataset.path={b}", f"hydra.run.dir={tmp_path / 'r2'}")
    assert res.code == 0, res.err
    m = metrics(tmp_path / "r2")
    assert m["train"]["data_source"] == f"dataset.path={b.resolve()}" and m["test"]["n_test"] == 25
    assert f"path: {b}" in (tmp_path / "r2" / "config.yaml").read_text()  # what was read is what is recorded
    res = vaexp_main("train", *args, f"dataset.path={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'r3'}")
    assert_one_line_error(res, 2, f"dataset.path={tmp_path / 'nowhere'}", "no such file")
    assert not (tmp_path / "r3").exists()


def test_case08_resume_with_another_run_dir_or_in_a_sweep_is_refused(run_copy, tmp_path, vaexp_main):
    before = tree(run_copy)
    other = tmp_path / "other"
    res = vaexp_main("train", f"resume={run_copy}", f"hydra.run.dir={other}")
    assert_one_line_error(res, 2, f"resume={run_copy} with hydra.run.dir={other}", "own directory")
    assert not other.exists() and tree(run_copy) == before
    res = vaexp_main("train", "-m", f"resume={run_copy}", "k=1,2", f"out_root={tmp_path / 'out'}")
    assert_one_line_error(res, 2, "not a sweep")
    assert not (tmp_path / "out").exists() and tree(run_copy) == before


def test_a_run_that_lost_its_checkpoint_is_never_silently_trained_again(run_copy, tmp_path, vaexp_main, monkeypatch):
    """resume= continues a run; without checkpoint.pt there is nothing to continue from, and
    starting at step 0 would silently replace it. A finished run's results are all in
    metrics.json (checkpoints deleted to save disk): they are reported, never trained over."""
    (run_copy / rundir.CHECKPOINT).unlink()
    res = vaexp_main("train", f"resume={run_copy}", "progress=false")
    assert res.code == 0 and "already finished" in res.out, res.err
    before = tree(run_copy)
    res = vaexp_main("train", f"resume={run_copy}", "schedule.epochs=3", "progress=false")  # longer: needs it
    assert_one_line_error(res, 2, f"{run_copy}: no checkpoint.pt there", "records 1 epochs", "restore checkpoint.pt")
    assert tree(run_copy) == before
    assert vaexp_main("report", run_copy, f"out={tmp_path / 'rep'}").code == 0
    stopped = tmp_path / "stopped"                                          # interrupted in its first epoch
    monkeypatch.setenv("VAEXP_INTERRUPT_AT_STEP", "2")
    assert vaexp_main("train", *TINY, f"hydra.run.dir={stopped}").code == 130
    monkeypatch.delenv("VAEXP_INTERRUPT_AT_STEP")
    (stopped / rundir.CHECKPOINT).unlink()
    before = tree(stopped)
    res = vaexp_main("train", f"resume={stopped}", "progress=false")
    assert_one_line_error(res, 2, f"resume={stopped}: no checkpoint.pt there", "nothing to continue")
    assert tree(stopped) == before
    assert vaexp_main("train", *TINY, f"hydra.run.dir={stopped}").code == 0  # its own command trains it afresh


def test_an_exported_interrupt_step_does_not_stop_the_resume_at_it(tmp_path, vaexp_main, monkeypatch):
    monkeypatch.setenv("VAEXP_INTERRUPT_AT_STEP", "3")
    run = tmp_path / "run"
    assert vaexp_main("train", *TINY, "schedule.epochs=2", f"hydra.run.dir={run}").code == 130
    res = vaexp_main("train", f"resume={run}", "progress=false")  # starts at step 3: goes on
    assert res.code == 0, res.err
    assert metrics(run)["run"]["global_step"] == 10


def test_a_resume_under_other_kernels_says_so_and_records_it(tmp_path, vaexp_main, monkeypatch):
    """Which kernels run (GEMM library, subnormals, compiled paths) changes a run's last bits: a
    resume under other ones continues correctly, but the run is no longer what one uninterrupted
    process computes, so the user is told and metrics.json keeps it."""
    run = tmp_path / "run"
    monkeypatch.setenv("VAEXP_INTERRUPT_AT_STEP", "3")
    assert vaexp_main("train", *TINY, "schedule.epochs=2", f"hydra.run.dir={run}").code == 130
    monkeypatch.delenv("VAEXP_INTERRUPT_AT_STEP")
    assert rundir.load_checkpoint(run)["state"]["kernels"]["compile"] is True
    monkeypatch.setenv("VAEXP_COMPILE", "0")
    with pytest.warns(RuntimeWarning, match=r"other kernels .*\(compile True -> False, tanh cephes -> torch, "
                                            r"compiled_step graph -> None\).* from step 3 not bit for bit"):
        res = vaexp_main("train", f"resume={run}", "progress=false")
    assert res.code == 0, res.err
    assert metrics(run)["train"]["kernel_changes"] == [{"step": 3, "compile": [True, False], "tanh": ["cephes", "torch"],
                                                        "compiled_step": ["graph", None]}]
    same = tmp_path / "same"                                  # the same kernels: nothing said, nothing kept
    monkeypatch.setenv("VAEXP_INTERRUPT_AT_STEP", "3")
    assert vaexp_main("train", *TINY, "schedule.epochs=2", f"hydra.run.dir={same}").code == 130
    monkeypatch.delenv("VAEXP_INTERRUPT_AT_STEP")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        res = vaexp_main("train", f"resume={same}", "progress=false")
    assert res.code == 0, res.err
    assert not [w for w in said if "other kernels" in str(w.message)]
    assert "kernel_changes" not in metrics(same)["train"]


@pytest.mark.parametrize("compile_then", [True, False])
def test_a_checkpoint_from_before_the_tanh_and_step_records_reads_as_their_old_forms(tmp_path, vaexp_main, monkeypatch,
                                                                                  compile_then):
    """Checkpoints written before kernels recorded the compiled graphs' tanh had torch's, and before
    they recorded the compiled step's form the step was the autograd one: resumed where vaexp may
    compile (so the Cephes tanh and the one-graph step), that is a change and says so; where it may
    not, nothing changed."""
    run = tmp_path / "run"
    if not compile_then:
        monkeypatch.setenv("VAEXP_COMPILE", "0")
    monkeypatch.setenv("VAEXP_INTERRUPT_AT_STEP", "3")
    assert vaexp_main("train", *TINY, "schedule.epochs=2", f"hydra.run.dir={run}").code == 130
    monkeypatch.delenv("VAEXP_INTERRUPT_AT_STEP")
    ck = rundir.load_checkpoint(run)
    assert ck["state"]["kernels"].pop("tanh") == ("cephes" if compile_then else "torch")
    assert ck["state"]["kernels"].pop("compiled_step") == ("graph" if compile_then else None)
    torch.save(ck, run / rundir.CHECKPOINT)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        res = vaexp_main("train", f"resume={run}", "progress=false")
    assert res.code == 0, res.err
    told = [str(w.message) for w in said if "other kernels" in str(w.message)]
    if compile_then:
        assert len(told) == 1 and "(tanh torch -> cephes, compiled_step autograd -> graph)" in told[0]
        assert metrics(run)["train"]["kernel_changes"] == [{"step": 3, "tanh": ["torch", "cephes"],
                                                            "compiled_step": ["autograd", "graph"]}]
    else:
        assert not told and "kernel_changes" not in metrics(run)["train"]


def test_a_sigterm_between_the_callback_and_the_command_leaves_nothing(tmp_path, vaexp_main, monkeypatch):
    """The callback has made and locked the run directory; Hydra writes .hydra/ before the command
    (and its own SIGTERM handler) starts. A SIGTERM there is handled as Ctrl-C: the directory is
    removed (Python's default action would exit at once and leave it, lock and all)."""
    import os
    import signal

    import hydra.core.utils

    real = hydra.core.utils._save_config

    def terminated(cfg, filename, output_dir):
        real(cfg, filename, output_dir)
        if filename == "overrides.yaml":
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(hydra.core.utils, "_save_config", terminated)
    out = tmp_path / "out"
    res = vaexp_main("train", *TINY, f"out_root={out}")
    assert_one_line_error(res, 130, "stopped by SIGTERM")
    assert not out.exists(), sorted(map(str, out.rglob("*")))


def test_a_sweep_over_directories_holding_other_runs_is_refused_before_anything_is_written(tmp_path, vaexp_main):
    """Jobs named by number: the second sweep's job 0 is the first sweep's directory. Refused as
    a whole, before Hydra rewrites that run's .hydra/ record or a job writes error.txt there."""
    where = [f"hydra.sweep.dir={tmp_path / 'sw'}", "hydra.sweep.subdir=${hydra.job.num}"]
    assert vaexp_main("train", "-m", *TINY, "seed=0,1", *where).code == 0
    before = tree(tmp_path / "sw")
    res = vaexp_main("train", "-m", *TINY, "seed=5,6", *where)
    assert_one_line_error(res, 2, "already holds a run with other settings: seed=5 (saved: 0)", "nothing was run")
    assert tree(tmp_path / "sw") == before
    assert vaexp_main("train", "-m", *TINY, "seed=0,1", *where).code == 0   # its own settings: skipped as finished


def test_hydras_record_of_another_command_never_replaces_a_runs_own(tmp_path):
    """hydra.output_subdir (vaexp.cli.configs.hydra_subdir): .hydra for a new directory or the same
    command again; a folder of its own below it for a resume or other overrides in a run's
    directory (launchers vaexp cannot check up front get to the job, which refuses)."""
    from vaexp.cli.configs import hydra_subdir

    run = tmp_path / "run"
    assert hydra_subdir(None, run, ["seed=0"]) == ".hydra"                      # nothing there yet
    (run / ".hydra").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")                               # a stack's job: no record yet
    assert hydra_subdir(None, run, ["seed=5"]) == ".hydra"
    (run / ".hydra" / "overrides.yaml").write_text("- seed=${m}\n- progress=false\n")
    assert hydra_subdir(None, run, ["seed=${m}"]) == ".hydra"                   # the same command (as typed)
    assert hydra_subdir(None, run, ["progress=true", "seed=${m}"]) == ".hydra"  # runtime-only keys do not count
    assert hydra_subdir(None, run, ["seed=5"]).startswith(".hydra/rerun-")
    assert hydra_subdir(str(run), run, []).startswith(".hydra/resume-")
    assert hydra_subdir(None, None, ["seed=5"]) == ".hydra"                     # not known yet
    # another command's record (vaexp snr -m over a train run's directory): never replaced
    (run / ".hydra" / "hydra.yaml").write_text("hydra:\n  job:\n    name: train\n")
    assert hydra_subdir(None, run, ["seed=${m}"], command="train") == ".hydra"
    assert hydra_subdir(None, run, ["seed=${m}"], command="snr").startswith(".hydra/rerun-")
    (run / ".hydra" / "hydra.yaml").write_text("not: [hydra")                     # unreadable: not snr's
    assert hydra_subdir(None, run, ["seed=${m}"], command="snr").startswith(".hydra/rerun-")


def test_case09_plus_overrides_are_refused_unless_meaningful(run_copy, tmp_path, vaexp_main):
    before = tree(run_copy)
    res = vaexp_main("eval", run_copy, "+k=5")
    assert_one_line_error(res, 2, "+k=5", "no setting k", "eval.k")
    assert tree(run_copy) == before
    res = vaexp_main("train", *TINY, "+kk=3", f"out_root={tmp_path / 'out'}")
    assert_one_line_error(res, 2, "+kk=3", "no setting kk")
    assert not (tmp_path / "out").exists()
    # ++ on a setting that exists is the setting itself
    res = vaexp_main("train", *TINY, "++seed=3", f"hydra.run.dir={tmp_path / 'r'}")
    assert res.code == 0, res.err
    assert "\nseed: 3\n" in (tmp_path / "r" / "config.yaml").read_text()


@pytest.mark.parametrize("override", ["eval.au_threshold=-1", "eval.au_threshold=nan", "eval.n_test=1"])
def test_case10_meaningless_active_unit_settings_are_refused(override, run_copy, vaexp_main, tmp_path):
    res = vaexp_main("train", *TINY, override, f"out_root={tmp_path / 'out'}")
    assert_one_line_error(res, 2, override.split("=")[0])
    assert not (tmp_path / "out").exists()
    before = tree(run_copy)
    assert_one_line_error(vaexp_main("eval", run_copy, override), 2, override.split("=")[0])
    assert tree(run_copy) == before


def test_case11_following_the_advice_after_an_interrupted_evaluation_keeps_the_train_summary(
        tmp_path, vaexp_main, monkeypatch):
    run = tmp_path / "run"
    real = vaexp.evaluate.evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(vaexp.evaluate, "evaluate", interrupted)
    res = vaexp_main("train", *TINY, f"hydra.run.dir={run}")
    line = assert_one_line_error(res, 130, "interrupted during the final evaluation", f"vaexp eval {run}")
    assert "resume=" in line
    train = metrics(run)["train"]
    assert train["epochs"] == 1 and train["steps"] == 5
    monkeypatch.setattr(vaexp.evaluate, "evaluate", real)
    assert vaexp_main("eval", run, "progress=false").code == 0
    res = vaexp_main("train", f"resume={run}", "progress=false")
    assert res.code == 0 and "already finished" in res.out, res.err
    after = metrics(run)
    assert after["train"] == train and len(after["evals"]) == 1


def test_case11_a_finished_run_cannot_be_shortened(tmp_path, vaexp_main):
    run = tmp_path / "run"
    assert vaexp_main("train", *TINY, "schedule.epochs=2", f"hydra.run.dir={run}").code == 0
    before = tree(run)
    res = vaexp_main("train", f"resume={run}", "schedule.epochs=1", "progress=false")
    assert_one_line_error(res, 2, "schedule.epochs=1", "already trained 2 epochs", "cannot be shortened")
    assert tree(run) == before  # config.yaml and metrics.json keep the epochs that happened


def test_case11_a_new_eval_setting_for_a_finished_run_points_to_vaexp_eval(run_copy, vaexp_main, trained):
    before = tree(run_copy)
    args = [a for a in TINY]
    res = vaexp_main("train", *args, "eval.k=20", f"hydra.run.dir={run_copy}")  # the command again, new eval.k
    assert_one_line_error(res, 2, "recorded with eval.k=10", f"resume={run_copy} eval.k=20",
                          f"vaexp eval {run_copy} eval.k=20")
    res = vaexp_main("train", f"resume={run_copy}", "eval.k=20", "progress=false")
    assert_one_line_error(res, 2, f"vaexp eval {run_copy} eval.k=20")
    assert tree(run_copy) == before  # .hydra/overrides.yaml included


# =========================================================================== one line for every fault

def _damage(run: Path, kind: str, trained: Path, tmp_path: Path, vaexp_main) -> None:
    ck = run / "checkpoint.pt"
    if kind == "truncated checkpoint":
        ck.write_bytes(ck.read_bytes()[:1000])
    elif kind == "empty checkpoint":
        ck.write_bytes(b"")
    elif kind == "checkpoint of another architecture":
        other = tmp_path / "other"
        assert vaexp_main("train", *TINY_RUN, "model=burda1", "model.latents=[3]", "model.hidden=[8]",
                          f"hydra.run.dir={other}").code == 0
        shutil.copy(other / "checkpoint.pt", ck)
    elif kind == "invalid yaml":
        (run / "config.yaml").write_text((run / "config.yaml").read_text() + "k: [\n")


DAMAGE = ["truncated checkpoint", "empty checkpoint", "checkpoint of another architecture", "invalid yaml"]
WORDS = {"truncated checkpoint": ["checkpoint.pt", "damaged"], "empty checkpoint": ["checkpoint.pt", "damaged"],
         "checkpoint of another architecture": ["checkpoint.pt", "model.latents=[3] (config.yaml: [4])"],
         "invalid yaml": ["config.yaml", "not valid YAML"]}


@pytest.mark.parametrize("kind", DAMAGE)
def test_case12_damaged_run_files_are_one_line_for_every_command(kind, run_copy, trained, tmp_path, vaexp_main):
    run = run_copy
    _damage(run, kind, trained, tmp_path, vaexp_main)
    before = tree(run)
    for args in (["train", *TINY, f"hydra.run.dir={run}"],                # re-run
                 ["train", f"resume={run}", "progress=false"],             # resume=
                 ["eval", str(run), "progress=false"],                     # vaexp eval
                 ["snr", f"run={run}", "draws=10", "k=[1]", "m=[1]", f"out_root={tmp_path / 'snr'}"]):
        res = vaexp_main(*args)
        assert_one_line_error(res, 2, *WORDS[kind])
        assert tree(run) == before, args                                    # nothing rewritten, nothing added
        assert not (tmp_path / "snr").exists()


def test_case12_metrics_json_of_the_wrong_shape_is_set_aside_not_a_crash(run_copy, vaexp_main, tmp_path):
    (run_copy / "metrics.json").write_text('{"test": [1, 2, 3]}')
    res = vaexp_main("train", *TINY, f"hydra.run.dir={run_copy}")  # not finished as far as anyone can tell
    assert res.code == 0 and "Traceback" not in res.err, res.err
    assert "was unreadable" in res.err and "evaluating" in res.out
    (aside,) = run_copy.glob("metrics.json.corrupt-*")
    assert aside.read_text() == '{"test": [1, 2, 3]}'
    assert metrics(run_copy)["train"]["steps"] == 5  # the train summary is rebuilt from the checkpoint


def test_case13_out_root_or_sweep_dir_that_is_a_file(vaexp_main, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    res = vaexp_main("train", *TINY, f"out_root={blocker}")
    assert_one_line_error(res, 2, f"out_root={blocker}", "cannot create the run directory", "not a folder")
    res = vaexp_main("train", "-m", *TINY, "k=1,2", f"hydra.sweep.dir={blocker}")
    assert_one_line_error(res, 2, f"hydra.sweep.dir={blocker}", "cannot create the sweep directory")
    assert blocker.read_text() == "mine" and {p.name for p in tmp_path.iterdir()} <= {"a-file", "vaexp-data"}


@needs_unshare
def test_case13_read_only_locations(trained, tmp_path, data_dir):
    """A read-only working directory (the default out_root), a read-only out_root mount, and a
    read-only run directory for `vaexp eval`: one line each, nothing written."""
    ro, run = tmp_path / "ro", tmp_path / "run"
    ro.mkdir()
    shutil.copytree(trained, run)
    before = tree(run)
    args = " ".join(TINY)
    script = f"""
        mount -t tmpfs -o ro tmpfs {ro} || exit 99
        mount --bind {run} {run} && mount -o remount,ro,bind {run} || exit 99
        cd {ro}; $V -m vaexp train {args} 2> {tmp_path}/e1; echo "rc1=$?"
        cd {tmp_path}; $V -m vaexp train -m {args} k=1,2 out_root={ro}/out 2> {tmp_path}/e2; echo "rc2=$?"
        $V -m vaexp eval {run} progress=false 2> {tmp_path}/e3; echo "rc3=$?"
    """
    proc = in_namespace(script, data_dir)
    if "rc1=" not in proc.stdout:
        pytest.skip(f"could not mount here: {proc.stderr[-300:]}")
    for i, words in ((1, ["out_root=outputs", "read-only file system"]), (2, [f"out_root={ro}/out", "read-only"]),
                     (3, [f"run={run}", "Read-only file system", "copy the run"])):
        assert f"rc{i}=2" in proc.stdout, (i, proc.stdout, (tmp_path / f"e{i}").read_text())
        err = (tmp_path / f"e{i}").read_text()
        assert "Traceback" not in err and all(w in err for w in words), (i, err)
    assert tree(run) == before


@pytest.mark.parametrize("command", ["eval", "resume"])
def test_case13_read_only_run_dir_without_namespaces(run_copy, vaexp_main, monkeypatch, command):
    """Where no mount is possible: the lock file cannot be created (as on a read-only run dir).
    For resume= the advice is to copy the run too (out_root= and hydra.run.dir= do not apply)."""
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).endswith(rundir.LOCK) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    before = tree(run_copy)
    monkeypatch.setattr(os, "open", read_only)
    if command == "eval":
        res = vaexp_main("eval", run_copy, "progress=false")
    else:
        res = vaexp_main("train", f"resume={run_copy}", "schedule.epochs=2")
    line = assert_one_line_error(res, 2, f"{'run' if command == 'eval' else 'resume'}={run_copy}",
                                 "Read-only file system", "copy the run")
    monkeypatch.undo()
    assert "out_root" not in line and "hydra.run.dir" not in line
    assert tree(run_copy) == before


def test_case14_memory_exhaustion_names_the_setting_to_lower(run_copy, tmp_path, vaexp_main, monkeypatch):
    out = tmp_path / "out"
    # a real allocation of ~1.6 TB (ε of 2·10⁹ rows, under the 2^31 rows refused up front, × 200 units)
    res = vaexp_main("train", *TINY, "k=100000000", "model.latents=[200]", f"out_root={out}")
    assert_one_line_error(res, 2, "out of memory while training", "k=100000000", "lower k")
    assert not out.exists()
    alloc = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                         "you tried to allocate 627200000000 bytes. Error code 12 (Cannot allocate memory)")

    def no_memory(*args, **kwargs):
        raise alloc

    before = tree(run_copy)
    monkeypatch.setattr(vaexp.evaluate, "log_likelihoods", no_memory)
    res = vaexp_main("eval", run_copy, "eval.chunk=100000", "progress=false")
    assert_one_line_error(res, 2, "out of memory while evaluating with", "eval.chunk=100000", "584 GiB",
                          "lower eval.chunk")
    assert tree(run_copy) == before  # eval.log included: the failed evaluation left nothing
    res = vaexp_main("train", *TINY, "eval.k=100000", "eval.chunk=1000", f"out_root={out}")
    assert_one_line_error(res, 2, "out of memory while evaluating", "eval.k=100000", "lower eval.chunk")
    monkeypatch.undo()

    def cuda_oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity")

    monkeypatch.setattr(vaexp.snr, "measure", cuda_oom)
    res = vaexp_main("snr", "k=[1000000]", "draws=10", f"out_root={tmp_path / 'snr'}")
    assert_one_line_error(res, 2, "out of memory in vaexp snr", "k=[1000000]", "20.00 GiB", "lower chunk")
    assert not (tmp_path / "snr").exists()


def test_case14_memory_error_while_loading_data(tmp_path, vaexp_main, monkeypatch):
    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(vaexp.training.loop, "load_dataset", no_memory)
    res = vaexp_main("train", *TINY, f"out_root={tmp_path / 'out'}")
    assert_one_line_error(res, 2, "out of memory", "nothing was kept")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override", ["dataset.binarize_seed=-5", "dataset.seed=-1", "schedule.lr=nan",
                                      "schedule.eps=nan", f"seed={2 ** 64}", "schedule.stage_epochs=100000000"])
def test_case15_settings_that_would_reach_torch_unchecked(override, tmp_path, vaexp_main):
    res = vaexp_main("train", *TINY, override, f"out_root={tmp_path / 'out'}")
    assert_one_line_error(res, 2, override if "stage" not in override else "more than 10,000,000 epochs")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,value,words", [("VAEXP_GEMM", "mkl", "one of auto, onednn, aten"),
                                             ("VAEXP_THREADS", "two", "a whole number >= 1"),
                                             ("VAEXP_THREADS", "0", "a whole number >= 1")])
def test_case15_environment_variables_with_values_vaexp_cannot_take(name, value, words, tmp_path, vaexp_main,
                                                                       monkeypatch):
    monkeypatch.setenv(name, value)
    res = vaexp_main("train", *TINY, f"out_root={tmp_path / 'out'}")
    assert_one_line_error(res, 2, f"{name}={value!r}", words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_case16_a_signal_while_loading_data_leaves_no_run_dir(sig, tmp_path, vaexp_main, monkeypatch, request):
    if sig == signal.SIGINT:  # Python's Ctrl-C handler, also where a shell started the tests in the background (SIG_IGN)
        old = signal.signal(signal.SIGINT, signal.default_int_handler)
        request.addfinalizer(lambda: signal.signal(signal.SIGINT, old))
    real = vaexp.training.loop.load_dataset

    def signalled(*args, **kwargs):
        signal.raise_signal(sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(vaexp.training.loop, "load_dataset", signalled)
    res = vaexp_main("train", *TINY, f"out_root={tmp_path / 'out'}")
    word = "interrupted" if sig == signal.SIGINT else "stopped by SIGTERM"
    assert_one_line_error(res, 130, word, "nothing was kept")
    assert not (tmp_path / "out").exists()


def test_case16_sigterm_during_the_final_evaluation(tmp_path, vaexp_main, monkeypatch):
    real, run = vaexp.evaluate.evaluate, tmp_path / "run"

    def terminated(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(vaexp.evaluate, "evaluate", terminated)
    res = vaexp_main("train", *TINY, f"hydra.run.dir={run}")
    assert_one_line_error(res, 130, "interrupted during the final evaluation", f"vaexp eval {run}")
    assert metrics(run)["run"]["state"] == "trained" and rundir.load_checkpoint(run)["state"]["epoch"] == 1


def test_case17_equals_in_a_path_is_quoted_and_elsewhere_gets_a_hint(tmp_path, vaexp_main, cli):
    run = tmp_path / "k=5,m=1"
    res = vaexp_main("train", *TINY, f"hydra.run.dir={run}")
    assert res.code == 0, res.err
    assert (run / "metrics.json").is_file()
    res = cli("train", *TINY, "sweep=a=b")
    assert_one_line_error(res, 2, "sweep=a=b", "must be quoted", "sweep='a=b'")


def test_debug_shows_the_traceback(cli, tmp_path):
    res = cli("train", "dataset=fashion_mnist", f"dataset.path={tmp_path / 'nowhere'}", "progress=false",
              f"out_root={tmp_path / 'out'}", env_extra={"VAEXP_DEBUG": "1"})
    assert res.code == 2 and "Traceback" in res.err and "vaexp: dataset.path=" in res.err
    assert not (tmp_path / "out").exists()


# =========================================================================== the transaction itself

def test_begin_is_reentrant_records_the_pid_and_takes_a_snapshot(tmp_path):
    d = tmp_path / "a" / "b"
    tx = rundir.begin(d)
    try:
        assert rundir.begin(d) is tx and tx.depth == 2 and rundir.held(d) is tx
        assert (d / rundir.LOCK).read_text().strip() == str(os.getpid())
        assert not tx.before.existed and tx.before.created_from == tmp_path / "a"
        (d / "x").write_text("x")
        assert tx.rollback() and not (tmp_path / "a").exists()  # the folders it created, too
    finally:
        tx.end()
        tx.end()
    assert rundir.held(d) is None


def test_a_lock_held_by_another_process_names_its_pid(tmp_path):
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); print('locked', flush=True); "
            "time.sleep(60)")
    tmp_path.joinpath("run").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run" / rundir.LOCK)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(rundir.RunDirBusy, match=f"in use by another vaexp process \\(pid {holder.pid}\\)"):
            rundir.begin(tmp_path / "run")
        assert rundir.held(tmp_path / "run") is None
    finally:
        holder.kill()
        holder.wait()
    with rundir.begin(tmp_path / "run"):
        pass


def test_rollback_keeps_a_directory_that_holds_a_result(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "checkpoint.pt").write_bytes(b"ck")
    with rundir.begin(d, scratch=("eval.log",)) as tx:
        (d / "eval.log").write_text("log")
        (d / "events.out.tfevents.2").write_text("e")
        assert tx.rollback() is False
    assert sorted(p.name for p in d.iterdir()) == [rundir.LOCK, "checkpoint.pt", "events.out.tfevents.2"]


def test_record_evaluation_never_overwrites_another_evaluations_file(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "test_log_px.0.pt").write_bytes(b"older evaluation")  # metrics.json that named it is lost
    ck = rundir.checkpoint_record({"epoch": 1, "step": 0, "global_step": 5}, 1)
    per = {"log_px": torch.zeros(3, dtype=torch.float64)}
    data = rundir.record_evaluation(d, {"k": 2, "n_test": 3, "nll": 1.0}, per, {"k": 2}, ck, by="eval")
    assert data["evals"][-1]["per_example"] == "test_log_px.1.pt"
    assert (d / "test_log_px.0.pt").read_bytes() == b"older evaluation"
    assert os.path.samefile(d / "test_log_px.1.pt", d / "test_log_px.pt")
    assert rundir.judge(data, 1) == ("finished", "")
    assert rundir.judge(data, 2)[0] == "unfinished"
    data["run"] = rundir.training_record({"epoch": 1, "global_step": 5}, 2, "training")
    assert "training went on" in rundir.judge(data, 2)[1]


def test_an_unexpected_error_in_the_checks_stops_the_run(vaexp_main, tiny_args, tmp_path, monkeypatch):
    """Hydra only warns about an exception raised in a callback and then runs the job anyway: a
    bug in a check must not let an unchecked run start (one line, exit != 0, no directory)."""
    import vaexp.cli.checks

    def broken(cfg):
        raise RuntimeError("a bug in a check")

    monkeypatch.setattr(vaexp.cli.checks, "validate_command", broken)
    res = vaexp_main("train", *tiny_args, f"hydra.run.dir={tmp_path / 'run'}")
    assert res.code != 0 and "a bug in a check" in res.err and "Traceback" not in res.err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- Hydra's own errors, arguments

@pytest.mark.parametrize("override,words", [
    ("kk=5", ["kk=5: vaexp train has no setting kk", "did you mean k?"]),
    ("schedule.lrr=1", ["no setting schedule.lrr", "did you mean schedule.lr?", "schedule's settings: name, lr"]),
    ("schedule.lr=abc", ["schedule.lr=abc: schedule.lr takes a float, not 'abc'"]),
    ("k=5.5", ["k=5.5: k takes an integer, not '5.5'"]),
    ("objective=iwea", ["objective=iwea: objective has no option iwea", "did you mean objective=iwae?",
                        "ciwae, iwae, jvi"]),
    ("k=[1,", ["k=[1,: Hydra cannot parse this override"]),
    ("+experiment=iwae_table1", ["+experiment=iwae_table1: experiment is a config group vaexp train already has",
                                 "without the +: experiment=iwae_table1"]),
])
def test_config_errors_are_one_line_with_status_2(vaexp_main, tmp_path, override, words):
    """Hydra's own report is 5-10 lines, suggests +key=value (which vaexp refuses) and exits 1,
    the status of a vaexp bug."""
    out = tmp_path / "out"
    for sweep in ([], ["-m"]):
        res = vaexp_main("train", *sweep, *TINY, override, f"out_root={out}")
        line = assert_one_line_error(res, 2, *words)
        assert "+kk" not in line and "HYDRA_FULL_ERROR" not in res.err and len(res.err.strip().splitlines()) == 1
        assert not out.exists()


def test_a_bad_value_in_a_sweep_is_a_config_error(vaexp_main, tmp_path):
    out = tmp_path / "out"
    # --help composes the config outside Hydra's own error report
    assert_one_line_error(vaexp_main("train", "--help", "kk=1"), 2, "kk=1: vaexp train has no setting kk")
    assert_one_line_error(vaexp_main("train", *TINY, "hydra.foo=1", f"out_root={out}"), 2, "--cfg hydra")
    assert_one_line_error(vaexp_main("train", "-m", *TINY, "k=1,a", f"out_root={out}"), 2, "k=a: k takes an integer")
    assert_one_line_error(vaexp_main("eval", "/nonexistent", "eval.kk=1"), 2, "vaexp eval has no setting eval.kk",
                          "did you mean eval.k?")
    assert not out.exists()


def test_eval_takes_one_run_directory(run_copy, tmp_path, vaexp_main):
    other = tmp_path / "other"
    other.mkdir()
    before = tree(run_copy)
    for args in ([str(run_copy), f"run={other}"], [str(run_copy), str(other)]):
        assert_one_line_error(vaexp_main("eval", *args), 2, "eval takes one run directory", str(run_copy))
    assert tree(run_copy) == before


def test_a_directory_of_another_command_is_not_a_run_to_continue(vaexp_main, tmp_path):
    snr_out = tmp_path / "snr"
    snr_out.mkdir()
    (snr_out / rundir.CONFIG).write_text("run: null\nk: [2]\nm: [1]\ndraws: 3\n")
    before = tree(snr_out)
    line = assert_one_line_error(vaexp_main("train", *TINY, f"hydra.run.dir={snr_out}"), 2,
                                 f"{snr_out} holds the output of another command", "use a new run directory")
    assert "resume=" not in line
    assert tree(snr_out) == before


def test_more_test_images_than_the_test_set_has_is_refused(vaexp_main, tmp_path, run_copy):
    out = tmp_path / "out"
    line = assert_one_line_error(vaexp_main("train", *TINY, "eval.n_test=100000", f"out_root={out}"), 2,
                                 "eval.n_test=100000: the test set of dataset=synthetic has", "eval.n_test=null")
    assert not list(out.rglob(rundir.CONFIG)), line
    before = tree(run_copy)
    assert_one_line_error(vaexp_main("eval", run_copy, "eval.n_test=100000", "progress=false"), 2, "eval.n_test=100000")
    assert tree(run_copy) == before


def test_eval_is_not_a_sweep(run_copy, vaexp_main, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = tree(run_copy)
    assert_one_line_error(vaexp_main("eval", "-m", f"run={run_copy}"), 2, "eval -m", "one by one")
    assert not (tmp_path / "multirun").exists() and tree(run_copy) == before
