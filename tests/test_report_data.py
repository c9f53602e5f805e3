"""`vaexp report` / `vaexp compare` and the data a run's evaluation scored (runs of one setting on
other test images are other rows, never seeds or copies of each other), and sweep jobs that failed
before they wrote config.yaml (listed as failed, from Hydra's record of the job)."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from test_compare import images, with_per_image
from test_report import evaluation, fake_run, read_csv
from vaexp.report import compare
from vaexp.report.runs import data_source, find_runs, group_runs, same_data

D1, D2, D3 = "1a" * 32, "2b" * 32, "3c" * 32


def on_data(d: Path, digest=None, source=None) -> Path:
    """Record in a fake run's metrics.json the digest of the test images its evaluation scored
    (None: an evaluation from before vaexp recorded it) and its train.data_source."""
    metrics = json.loads((d / "metrics.json").read_text())
    if digest is not None:
        metrics["evals"][-1]["test_images"] = metrics["test"]["test_images"] = digest
    if source is not None:
        metrics["train"]["data_source"] = source
    (d / "metrics.json").write_text(json.dumps(metrics))
    return d


def table_rows(out: str):
    return [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| objective")]


# --------------------------------------------------------------------------- defect A: the data

def test_runs_on_other_test_images_are_other_rows_not_duplicates(tmp_path, vaexp_main):
    """The repro: r1 on d1, r2 and r3 (seed 1) on d2, all one setting otherwise. Two rows (d1: one
    seed; d2: seeds 0 and 1), a data column naming each, no duplicate."""
    s = tmp_path / "DS"
    on_data(fake_run(s, "r1", seed=0, nll=487.2), D1, "dataset.path=/data/d1")
    on_data(fake_run(s, "r2", seed=0, nll=484.8), D2, "dataset.path=/data/d2")
    on_data(fake_run(s, "r3", seed=1, nll=484.2), D2, "dataset.path=/data/d2")
    res = vaexp_main("report", s, "plots=false")
    assert res.code == 0, res.err
    assert "duplicate" not in res.err and "Duplicates" not in res.out
    assert "3 finished run(s) in 2 setting(s)" in res.err
    header = next(line for line in res.out.splitlines() if line.startswith("| objective"))
    assert header.rstrip(" |").endswith("| data"), header
    rows = table_rows(res.out)
    assert len(rows) == 2
    d2 = next(r for r in rows if "sha256:2b2b2b2b2b2b (dataset.path=/data/d2)" in r)
    d1 = next(r for r in rows if "sha256:1a1a1a1a1a1a (dataset.path=/data/d1)" in r)
    assert "| 2 (0,1) | 484.50 ± 0.42 |" in d2 and "| 1 (0) | 487.20 |" in d1
    assert "data: the test images each run's evaluation scored" in res.out
    summary = sorted(read_csv(s / "report" / "summary.csv"), key=lambda r: r["n_seeds"])
    assert [r["n_seeds"] for r in summary] == ["1", "2"] and "d1" in summary[0]["data"]
    runs = {r["run"]: r for r in read_csv(s / "report" / "runs.csv")}
    assert {r["status"] for r in runs.values()} == {"finished"}
    assert runs["r1"]["test_images"] == D1 and runs["r2"]["data_source"] == "dataset.path=/data/d2"
    # vaexp compare: one setting per data, never paired
    for name in ("r1", "r2", "r3"):
        with_per_image(s / name, images(20, 0))
    res = vaexp_main("compare", s)
    assert res.code == 2 and "other test images were scored" in res.err, res.err


def test_one_digest_is_one_setting_whatever_source_read_it(tmp_path, vaexp_main):
    """Seeds that scored the same images (one read them from the files, one from the cache they
    filled) are one row, and the data, shared by all, is no column."""
    s = tmp_path / "s"
    on_data(fake_run(s, "a", seed=0, nll=85.0), D1, "torchvision MNIST download")
    on_data(fake_run(s, "b", seed=1, nll=86.0), D1, "cache /c/mnist.pt (from torchvision MNIST download)")
    res = vaexp_main("report", s, "plots=false")
    assert res.code == 0, res.err
    assert len(table_rows(res.out)) == 1 and "| 2 (0,1) | 85.50 ± 0.71 |" in res.out
    assert "| data" not in res.out


def test_old_evaluations_are_told_apart_by_their_recorded_data_source(tmp_path, vaexp_main):
    """Evaluations from before the digest: the data source each run recorded decides (a cache read
    as the source that filled it); other sources are other rows, and compare does not pair them."""
    s = tmp_path / "s"
    n = 20
    for name, seed, nll, source in (("a0", 0, 85.0, "dataset.path=/data/a"),
                                    ("a1", 1, 86.0, "cache /c/mnist.pt (from dataset.path=/data/a)"),
                                    ("b0", 0, 90.0, "dataset.path=/data/b")):
        d = on_data(fake_run(s, name, seed=seed, nll=nll, evals=[evaluation(nll, seed, settings={"n_test": n})]),
                    None, source)
        with_per_image(d, images(n, seed, nll))
    runs, _ = find_runs([s])
    assert data_source(next(r for r in runs if r.name == "a1")) == "dataset.path=/data/a"
    assert sorted(len(g.runs) for g in group_runs(runs)) == [1, 2]
    res = vaexp_main("report", s, "plots=false")
    assert res.code == 0, res.err
    assert "duplicate" not in res.err
    rows = table_rows(res.out)
    assert len(rows) == 2
    assert any("| 2 (0,1) |" in r and "dataset.path=/data/a (test images not recorded)" in r for r in rows)
    assert any("| 1 (0) | 90.00 |" in r and "dataset.path=/data/b (test images not recorded)" in r for r in rows)
    section = res.out.split("## Paired comparisons")[1]
    assert "No comparable pair of settings." in section and "other data" in section


def test_an_old_evaluation_joins_the_digest_of_its_source_and_an_unrecorded_one_its_settings(tmp_path, vaexp_main):
    """A run evaluated before the digest, on the source that digested runs of its test-set settings
    read (one set of images), is on those images; a run that recorded nothing is on the data of the
    other runs of its setting when they are all on one, and its own row ("not recorded") when not."""
    s = tmp_path / "s"
    on_data(fake_run(s, "new", seed=0, nll=85.0), D1, "dataset.path=/data/a")
    on_data(fake_run(s, "old", seed=1, nll=86.0), None, "dataset.path=/data/a")
    fake_run(s, "bare", seed=2, nll=87.0)                                    # nothing recorded
    res = vaexp_main("report", s, "plots=false")
    assert res.code == 0, res.err
    assert len(table_rows(res.out)) == 1 and "| 3 (0,1,2) | 86.00 ± 1.00 |" in res.out
    # a second data for the setting: the bare run can no longer be placed, and says so
    on_data(fake_run(s, "other", seed=3, nll=95.0), D2, "dataset.path=/data/z")
    res = vaexp_main("report", s, "plots=false")
    assert res.code == 0, res.err
    rows = table_rows(res.out)
    assert len(rows) == 3
    assert any("| 2 (0,1) |" in r and "sha256:1a1a1a1a1a1a (dataset.path=/data/a)" in r for r in rows)
    assert any("| 1 (2) |" in r and "| not recorded |" in r for r in rows)
    assert any("| 1 (3) |" in r and "sha256:2b2b2b2b2b2b" in r for r in rows)


def test_copies_on_the_same_data_still_count_once(tmp_path, vaexp_main):
    s = tmp_path / "s"
    on_data(fake_run(s, "a", seed=0, nll=85.0), D1, "dataset.path=/data/a")
    on_data(fake_run(s, "a-copy", seed=0, nll=85.0), D1, "dataset.path=/data/a")
    on_data(fake_run(s, "c", seed=0, nll=85.0), D3, "dataset.path=/data/c")
    res = vaexp_main("report", s, "plots=false")
    assert res.code == 0, res.err
    assert "2 finished run(s) in 2 setting(s), 1 duplicate(s) counted once" in res.err
    assert "`a-copy`: same settings and seed as `a`" in res.out


def test_digests_alike_in_their_first_digits_get_longer_labels(tmp_path, vaexp_main):
    s = tmp_path / "s"
    on_data(fake_run(s, "a", nll=85.0), "ab" * 8 + "0" * 48)
    on_data(fake_run(s, "b", nll=86.0), "ab" * 8 + "1" * 48)
    res = vaexp_main("report", s, "plots=false")
    assert res.code == 0, res.err
    labels = {r["data"] for r in read_csv(s / "report" / "summary.csv")}
    assert len(labels) == 2 and all(len(lbl.split(":")[1]) > 16 for lbl in labels), labels


def test_same_data_is_equal_or_not_recorded():
    assert same_data(None, ("sha256", D1, None)) and same_data(("source", "x", D2), None)
    assert same_data(("sha256", D1, D3), ("sha256", D1, D3)) and not same_data(("sha256", D1, D3), ("sha256", D2, D3))
    assert not same_data(("source", "x", None), ("sha256", D1, None))
    # the training data: equal where both recorded it
    assert not same_data(("sha256", D1, D2), ("sha256", D1, D3))
    assert same_data(("sha256", D1, None), ("sha256", D1, D3)) and same_data(("sha256", D1, D3), ("sha256", D1, None))


def trained_on(d: Path, digest: str) -> Path:
    """Record in a fake run's metrics.json the digest of the data its training read."""
    metrics = json.loads((d / "metrics.json").read_text())
    metrics["train"]["training_data"] = digest
    (d / "metrics.json").write_text(json.dumps(metrics))
    return d


def test_runs_on_other_training_data_are_other_rows(tmp_path, vaexp_main):
    """The same test images, other training data (two dataset.path folders sharing their test
    files): two rows labelled by the training data, never seeds of one; compare does not pair them."""
    s = tmp_path / "s"
    n = 20
    for name, seed, nll, train in (("a0", 0, 85.0, D2), ("a1", 1, 86.0, D2), ("b0", 0, 90.0, D3)):
        run = fake_run(s, name, seed=seed, nll=nll, evals=[evaluation(nll, seed, settings={"n_test": n})])
        d = trained_on(on_data(run, D1, f"dataset.path=/data/{name[0]}"), train)
        with_per_image(d, images(n, seed, nll))
    res = vaexp_main("report", s, "plots=false")
    assert res.code == 0, res.err
    assert "duplicate" not in res.err and "3 finished run(s) in 2 setting(s)" in res.err
    rows = table_rows(res.out)
    assert len(rows) == 2
    assert any("| 2 (0,1) |" in r and "sha256:1a1a1a1a1a1a (dataset.path=/data/a), training data sha256:2b2b2b2b2b2b"
               in r for r in rows), rows
    assert any("| 1 (0) | 90.00 |" in r and "training data sha256:3c3c3c3c3c3c" in r for r in rows), rows
    runs = {r["run"]: r for r in read_csv(s / "report" / "runs.csv")}
    assert runs["b0"]["training_data"] == D3 and runs["a0"]["test_images"] == D1
    res = vaexp_main("compare", s)
    assert res.code == 2 and "trained on other data" in res.err, res.err


def test_a_run_from_before_the_training_digest_joins_the_one_training_data_of_its_test_images(tmp_path, vaexp_main):
    """A run that recorded no training digest is on the training data of the runs on its test
    images when they all trained on one; when they trained on two, it is its own row."""
    s = tmp_path / "s"
    trained_on(on_data(fake_run(s, "new", seed=0, nll=85.0), D1), D2)
    on_data(fake_run(s, "old", seed=1, nll=86.0), D1)
    res = vaexp_main("report", s, "plots=false")
    assert res.code == 0, res.err
    assert len(table_rows(res.out)) == 1 and "| 2 (0,1) | 85.50 ± 0.71 |" in res.out and "| data" not in res.out
    trained_on(on_data(fake_run(s, "other", seed=2, nll=95.0), D1), D3)
    res = vaexp_main("report", s, "plots=false")
    assert res.code == 0, res.err
    rows = table_rows(res.out)
    assert len(rows) == 3
    assert any("| 1 (1) |" in r and "training data not recorded" in r for r in rows), rows


def test_a_run_records_the_data_it_trained_on(tmp_path, data_dir, vaexp_main):
    """Real runs on two dataset.path folders with the same test files and other training files:
    the same test digest, other training digests (the same for another seed on the same files),
    and the report tells the two apart."""
    from test_data import fake_pixels, write_idx_dir

    from conftest import TINY_BURDA1

    test = fake_pixels(30, 2)
    folders = {"a": write_idx_dir(tmp_path / "a", fake_pixels(140, 1), test),
               "b": write_idx_dir(tmp_path / "b", fake_pixels(140, 3), test)}
    args = ["dataset=mnist", "dataset.n_valid=20", "schedule=quick", "schedule.epochs=1", "eval.k=10",
            "eval.au_samples=4", "progress=false", *TINY_BURDA1]
    for name, folder, seed in (("a0", "a", 0), ("a1", "a", 1), ("b0", "b", 0)):
        res = vaexp_main("train", *args, f"seed={seed}", f"dataset.path={folders[folder]}",
                         f"hydra.run.dir={tmp_path / 'runs' / name}")
        assert res.code == 0, res.err
    m = {name: json.loads((tmp_path / "runs" / name / "metrics.json").read_text()) for name in ("a0", "a1", "b0")}
    assert len({x["test"]["test_images"] for x in m.values()}) == 1
    digest = m["a0"]["train"]["training_data"]
    assert len(digest) == 64 and m["a1"]["train"]["training_data"] == digest != m["b0"]["train"]["training_data"]
    res = vaexp_main("report", tmp_path / "runs", "plots=false")
    assert res.code == 0, res.err
    rows = table_rows(res.out)
    assert len(rows) == 2 and any("| 2 (0,1) |" in r and f"training data sha256:{digest[:12]}" in r for r in rows)


def test_compare_pairs_an_unrecorded_run_on_its_settings(tmp_path):
    """vaexp compare's rule, kept: a run whose evaluation recorded no digest (and no data source)
    is compared on its settings."""
    n = 20
    for name, obj, nll, digest in (("a", "iwae", 85.0, D1), ("b", "vae", 86.0, None)):
        d = on_data(fake_run(tmp_path / "s", name, objective=obj, nll=nll,
                             evals=[evaluation(nll, settings={"n_test": n})]), digest)
        with_per_image(d, images(n, int(nll)))
    assert len(compare.compare([tmp_path / "s"], write=False)["rows"]) == 1


# --------------------------------------------------------------------------- defect B: failed before config.yaml

def failed_job(sweep: Path, name: str, overrides, error: str, composed=None, config_name: str = "train") -> Path:
    """A sweep job directory as a job that failed before writing config.yaml leaves it: error.txt
    and Hydra's .hydra/ record (config.yaml: the composed config, unless composed is False)."""
    d = sweep / name
    (d / ".hydra").mkdir(parents=True)
    (d / "error.txt").write_text(f"{error}\n\n(recorded 2026-12-02 03:19:44; re-run the sweep to retry this job)\n")
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    (d / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"name": config_name,
                                                                                "config_name": config_name}}}))
    if composed is not False:
        (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(composed))
    return d


def composed_config(where: Path, **changes):
    """What Hydra composes for a job: fake_run's config.yaml with the given changes (dotted keys)."""
    cfg = yaml.safe_load((fake_run(where, "composed") / "config.yaml").read_text())
    for key, value in changes.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return cfg


NO_DATA = ("dataset=binarized_mnist: no data found (tried: dataset.path: not set; cache /c/binarized_mnist.pt: "
           "not present); download the .amat files and pass dataset.path=/that/folder")


def test_a_job_that_failed_before_config_yaml_is_listed_with_its_error(tmp_path, vaexp_main):
    sweep = tmp_path / "sw1"
    fake_run(sweep, "dataset=synthetic", dataset="synthetic", nll=80.0)
    failed_job(sweep, "dataset=binarized_mnist,m=2,mk=16", ["dataset=binarized_mnist", "m=2", "mk=16", "sweep=sw1"],
               NO_DATA, composed_config(tmp_path / "tmp", **{"dataset.name": "binarized_mnist", "m": 2, "mk": 16,
                                                             "k": 5}))
    res = vaexp_main("report", sweep, "plots=false")
    assert res.code == 0, res.err
    assert "1 finished run(s) in 1 setting(s), 1 not finished" in res.err
    assert "Not finished (1):" in res.out
    line = next(ln for ln in res.out.splitlines() if ln.startswith("- `dataset=binarized_mnist,m=2,mk=16`"))
    assert f"failed: {NO_DATA}" in line and "no checkpoint yet" in line and ".hydra/config.yaml" in line
    assert "run its sweep's command again" in line
    rows = {r["run"]: r for r in read_csv(sweep / "report" / "runs.csv")}
    row = rows["dataset=binarized_mnist,m=2,mk=16"]
    assert row["status"] == "failed" and row["detail"].startswith(NO_DATA)
    assert (row["dataset"], row["m"], row["k"], row["mk"]) == ("binarized_mnist", "2", "8", "16")  # k = mk/m
    assert rows["dataset=synthetic"]["status"] == "finished"
    assert "binarized_mnist" in (sweep / "report" / "report.md").read_text()


def test_without_hydras_composed_config_the_overrides_name_the_settings(tmp_path, vaexp_main):
    sweep = tmp_path / "s"
    fake_run(sweep, "done", nll=80.0)
    failed_job(sweep, "dataset=mnist,eval.n_test=50000", ["dataset=mnist", "eval.n_test=50000", "progress=False"],
               "eval.n_test=50000: larger than the 10000 test images of dataset=mnist", composed=False)
    res = vaexp_main("report", sweep, "plots=false")
    assert res.code == 0, res.err
    assert "- `dataset=mnist,eval.n_test=50000`: failed: eval.n_test=50000: larger than" in res.out
    row = {r["run"]: r for r in read_csv(sweep / "report" / "runs.csv")}["dataset=mnist,eval.n_test=50000"]
    assert row["status"] == "failed" and row["dataset"] == "mnist" and row["n_test"] == "50000"
    assert ".hydra/overrides.yaml" in row["detail"]


def test_another_commands_failed_job_is_not_a_training_run(tmp_path, vaexp_main):
    """A `vaexp snr -m` job that failed writes error.txt too: not a run of the report."""
    sweep = tmp_path / "s"
    fake_run(sweep, "done", nll=80.0)
    failed_job(sweep / "mnist_burda1", "k=[1,5]", ["k=[1,5]"], "snr failed", {"k": [1, 5], "m": [1]},
               config_name="snr")
    res = vaexp_main("report", sweep, "plots=false")
    assert res.code == 0, res.err
    assert "not finished" not in res.err and "Not finished" not in res.out


def test_a_real_sweep_whose_every_job_failed_before_config_yaml(tmp_path, vaexp_main, data_dir):
    """binarized_mnist is not available offline (it is never downloaded): the job fails loading it,
    before config.yaml; the report says no run finished and names the failure."""
    res = vaexp_main("train", "-m", "dataset=binarized_mnist", "objective=miwae", "mk=16", "m=2", "schedule=quick",
                     "schedule.epochs=1", "progress=false", "sweep=sw1", f"out_root={tmp_path / 'o'}")
    assert res.code == 1, res.err
    sweep = tmp_path / "o" / "multirun" / "sw1"
    (job,) = [p for p in sweep.iterdir() if p.is_dir()]
    assert (job / "error.txt").is_file() and not (job / "config.yaml").exists()
    runs, skipped = find_runs([sweep])
    assert not skipped and [(r.status, r.flat.get("dataset.name"), r.flat.get("k")) for r in runs] == \
        [("failed", "binarized_mnist", 8)]
    res = vaexp_main("report", sweep)
    assert res.code == 2 and "no run has finished (1 not finished; 1 of them failed" in res.err, res.err
    assert "binarized_mnist: no data found" in res.err
