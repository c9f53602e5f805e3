"""`vaexp report <dir>...` on hand-made run directories (config.yaml + metrics.json, and TensorBoard
events where curves matter): tables, CSVs, seed statistics, plots, partial sweeps, bad input."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from vaexp.report import read_curves

PNG = b"\x89PNG\r\n\x1a\n"


EVAL = {"k": 5000, "report_k": [1, 64], "chunk": 0, "n_test": None, "every": 0, "seed": 0}
EPOCHS = 3280  # the burda schedule


def evaluation(nll: float, seed: int = 0, surgery: bool = True, settings=None, epoch: int = EPOCHS,
               global_step: int = 9774400) -> dict:
    """One metrics.json evaluation entry as vaexp writes it: metrics, settings, checkpoint."""
    settings = dict(EVAL, **(settings or {}))
    n_test = settings["n_test"] or 10000
    test = {"k": settings["k"], "n_test": n_test, "nll": nll, "nll_stderr": 0.3, f"L{settings['k']}": -nll,
            "L1": -nll - 4.0, "L64": -nll - 1.0, "active_units": [20 + seed], "latent_units": [50]}
    if surgery:
        test.update({"surgery_n": 1000, "recon": -60.0, "avg_kl": 25.0, "mutual_info": 6.0, "marginal_kl": 19.0})
    return {**test, "time": "2026-01-01 00:00:00", "settings": settings, "by": "train",
            "checkpoint": {"epoch": epoch, "step": 0, "global_step": global_step, "epochs": EPOCHS,
                           "finished": epoch == EPOCHS, "diverged": False}}


def fake_run(root: Path, name: str, *, dataset="mnist", model="burda1", objective="miwae", estimator="reparam",
             m=1, k=64, beta=0.5, seed=0, nll=85.0, status="finished", lr=1e-3, epoch=None, surgery=True,
             evals=None, run=None, **extra) -> Path:
    """A run directory as vaexp train leaves it. evals / run: metrics.json's list of evaluations
    and training record instead of one finished evaluation."""
    d = root / name
    d.mkdir(parents=True)
    cfg = {"dataset": {"name": dataset, "path": None, "n_valid": 400, "binarize_seed": 1234},
           "model": {"name": model, "latents": [50] if model == "burda1" else [100, 50], "hidden": [200]},
           "objective": {"name": objective}, "estimator": {"name": estimator},
           "schedule": {"name": "burda", "lr": lr, "stages": 8, "epochs_base": 3, "lr_decay": 10 ** (-1 / 7),
                        "stage_epochs": None, "epochs": None, "beta1": 0.9, "beta2": 0.999, "eps": 1e-4},
           "eval": dict(EVAL),
           "k": k, "m": m, "beta": beta, "seed": seed, "device": "cuda", "batch_size": 20, "log_every": 200,
           "resume": None, "out_root": "outputs", "progress": True, "mk": None, "sweep": "s", **extra}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    if status == "finished" or evals is not None or run is not None:
        evals = [evaluation(nll, seed, surgery)] if evals is None else evals
        last = evals[-1]["checkpoint"] if evals else {"epoch": EPOCHS, "global_step": 9774400}
        run = run or {"state": "trained", "epoch": last["epoch"], "global_step": last["global_step"],
                      "epochs": EPOCHS}
        metrics = {"run": run, "train": {"bound": -nll - 2.0, "valid_bound": -nll - 3.0, "epochs": last["epoch"],
                                         "steps": last["global_step"], "wall_time_s": 3600.0 * (1 + seed),
                                         "device": "cuda"}, "evals": evals}
        if evals:
            metrics["test"] = {k: v for k, v in evals[-1].items() if k not in ("time", "settings", "checkpoint", "by")}
        (d / "metrics.json").write_text(json.dumps(metrics))
    elif status == "failed":
        (d / "error.txt").write_text("batch_size=500: larger than the 100 training images; lower batch_size\n\nmore\n")
    if epoch is not None:
        torch.save({"state": {"epoch": epoch, "global_step": 10 * epoch}}, d / "checkpoint.pt")
    return d


def read_csv(path: Path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_runtime_only_settings_do_not_split_a_setting(tmp_path, vaexp_main):
    """Two seeds of one setting, one trained stacked with the captured step off, are one setting
    (stack, fast, device, log_every are vaexp.rundir.RUNTIME_ONLY): one row of two seeds, no
    spurious columns."""
    sweep = tmp_path / "sweep"
    fake_run(sweep, "a", seed=0, nll=85.0, stack=False, fast="auto", log_every=200)
    fake_run(sweep, "b", seed=1, nll=86.0, stack=True, fast="false", log_every=50)
    res = vaexp_main("report", sweep)
    assert res.code == 0, res.err
    rows = read_csv(sweep / "report" / "summary.csv")
    assert len(rows) == 1 and rows[0]["n_seeds"] == "2" and rows[0]["seeds"] == "0;1"
    assert not {"stack", "fast", "log_every"} & set(rows[0])
    assert "85.50 ± 0.71" in res.out and "| stack" not in res.out and "| fast" not in res.out


def test_a_varying_model_latents_is_one_column_of_the_csvs(tmp_path, vaexp_main):
    """The CSVs have a latents column of their own: a sweep over model.latents adds no second
    (model.latents) one; the markdown table, which has none, shows it as an extra column."""
    sweep = tmp_path / "sweep"
    fake_run(sweep, "a", nll=85.0)
    b = fake_run(sweep, "b", nll=86.0)
    cfg = yaml.safe_load((b / "config.yaml").read_text())
    cfg["model"]["latents"] = [20]
    (b / "config.yaml").write_text(yaml.safe_dump(cfg))
    res = vaexp_main("report", sweep)
    assert res.code == 0, res.err
    for name in ("runs.csv", "summary.csv"):
        rows = read_csv(sweep / "report" / name)
        assert "model.latents" not in rows[0], name
        assert sorted(r["latents"] for r in rows) == ["20", "50"], name
    header = next(line for line in res.out.splitlines() if line.startswith("| "))
    assert "latents" in header, header


def test_table_csvs_and_seed_statistics(tmp_path, vaexp_main):
    sweep = tmp_path / "sweep"
    for seed, nll in ((0, 85.0), (1, 86.0), (2, 87.5)):
        fake_run(sweep, f"m=1,seed={seed}", m=1, k=64, seed=seed, nll=nll)
    fake_run(sweep, "m=4,seed=0", m=4, k=16, nll=84.0)
    res = vaexp_main("report", sweep)
    assert res.code == 0, res.err
    out = sweep / "report"
    # stdout: the markdown table, one row per setting; the three seeds give mean ± sample std
    assert "| miwae | 1 | 64 | – | 3 (0,1,2) | 86.17 ± 1.26 |" in res.out
    assert "| miwae | 4 | 16 | – | 1 (0) | 84.00 |" in res.out   # one seed: a count too, not "0"
    assert "All runs: dataset=mnist, model=burda1, estimator=reparam." in res.out
    assert (out / "report.md").read_text() == res.out
    runs = read_csv(out / "runs.csv")
    assert len(runs) == 4 and {r["status"] for r in runs} == {"finished"}
    by_seed = {r["run"]: r for r in runs}
    assert float(by_seed["m=1,seed=1"]["test_nll"]) == 86.0 and by_seed["m=1,seed=1"]["mk"] == "64"
    assert by_seed["m=1,seed=1"]["active_units"] == "21" and float(by_seed["m=1,seed=1"]["L64"]) == -87.0
    assert float(by_seed["m=1,seed=1"]["mutual_info"]) == 6.0
    summary = {r["m"]: r for r in read_csv(out / "summary.csv")}
    s = summary["1"]
    assert s["n_seeds"] == "3" and s["seeds"] == "0;1;2"
    assert float(s["test_nll_mean"]) == pytest.approx(86.1666666, abs=1e-6)
    assert float(s["test_nll_std"]) == pytest.approx(math.sqrt(((85 - 86.16667) ** 2 + (86 - 86.16667) ** 2
                                                               + (87.5 - 86.16667) ** 2) / 2), abs=1e-4)
    assert float(s["wall_time_s_mean"]) == 7200.0 and s["active_units_mean"] == "21"
    assert summary["4"]["test_nll_std"] == ""           # one seed: no std
    # an M*K line with two M: the NLL-vs-M plot
    assert (out / "nll_vs_m_mk64.png").read_bytes()[:8] == PNG


def test_grid_heatmap_and_lines_per_objective(tmp_path, vaexp_main):
    sweep = tmp_path / "grid"
    nll = {(1, 4): 90.0, (1, 16): 88.0, (4, 4): 89.0, (4, 16): 87.0}
    for (m, k), v in nll.items():
        for obj in ("miwae", "piwae"):
            fake_run(sweep, f"{obj},m={m},k={k}", objective=obj, m=m, k=k, nll=v + (obj == "piwae"))
    fake_run(sweep, "ciwae", objective="ciwae", m=1, k=16, beta=0.05, nll=86.0)
    res = vaexp_main("report", sweep, f"out={tmp_path / 'rep'}")
    assert res.code == 0, res.err
    out = tmp_path / "rep"
    names = {p.name for p in out.iterdir()}
    assert {"heatmap_miwae_reparam.png", "heatmap_piwae_reparam.png", "nll_vs_m_mk16.png"} <= names
    assert "heatmap_ciwae_reparam_beta0.05.png" not in names      # one point is no grid
    assert not (sweep / "report").exists()                          # out= puts it elsewhere
    assert "| ciwae | 1 | 16 | 0.05 |" in res.out                    # beta shown for ciwae only
    assert "| miwae | 4 | 4 | – |" in res.out


def test_partial_sweep_lists_what_did_not_finish(tmp_path, vaexp_main):
    sweep = tmp_path / "s"
    fake_run(sweep, "done", nll=85.0)
    fake_run(sweep, "running", status="unfinished", m=2, k=32, epoch=7)
    fake_run(sweep, "not_started", status="unfinished", m=4, k=16)
    fake_run(sweep, "broken", status="failed", m=8, k=8, epoch=2)
    (sweep / ".submitit" / "123").mkdir(parents=True)        # launcher folders are not runs
    (sweep / ".submitit" / "123" / "config.yaml").write_text("a: 1\n")
    res = vaexp_main("report", sweep, "plots=false")
    assert res.code == 0, res.err
    assert "Not finished (3):" in res.out
    assert "- `running`: checkpoint at epoch 7/3280, step 70" in res.out
    assert "- `not_started`: no checkpoint yet" in res.out
    assert "- `broken`: failed: batch_size=500: larger than the 100 training images" in res.out
    assert "checkpoint at epoch 2/3280" in res.out
    rows = {r["run"]: r for r in read_csv(sweep / "report" / "runs.csv")}
    assert rows["running"]["status"] == "unfinished" and rows["running"]["test_nll"] == ""
    assert rows["broken"]["status"] == "failed"
    assert not list((sweep / "report").glob("*.png"))       # plots=false


def test_a_diverged_sweep_job_is_diverged_not_failed(tmp_path, vaexp_main):
    """A sweep job that diverges records error.txt as every failed job does; running the sweep
    again would only diverge again, so the report says diverged and to lower the learning rate."""
    sweep = tmp_path / "s"
    fake_run(sweep, "done", nll=85.0)
    d = fake_run(sweep, "nan", m=2, k=32, run={"state": "diverged", "message": "training bound became nan",
                                                 "epoch": 4, "global_step": 40, "epochs": 3280}, epoch=3)
    (d / "error.txt").write_text("training bound became nan at epoch 5\n")
    res = vaexp_main("report", sweep, "plots=false")
    assert res.code == 0, res.err
    rows = {r["run"]: r for r in read_csv(sweep / "report" / "runs.csv")}
    assert rows["nan"]["status"] == "diverged" and rows["nan"]["test_nll"] == ""
    assert "lower schedule.lr" in res.out and "fix the error" not in res.out


def test_corrupt_metrics_is_skipped_with_a_warning(tmp_path, vaexp_main):
    sweep = tmp_path / "s"
    fake_run(sweep, "good", nll=85.0)
    bad = fake_run(sweep, "bad", m=2, k=32)
    (bad / "metrics.json").write_text('{"train": {"bound": -8')
    res = vaexp_main("report", sweep)
    assert res.code == 0, res.err
    assert f"warning: skipped {bad}: unreadable metrics.json" in res.err
    assert "Skipped (1):" in res.out and "| miwae | 1 | 64 |" in res.out
    assert len(read_csv(sweep / "report" / "runs.csv")) == 1


def test_different_datasets_get_separate_plots(tmp_path, vaexp_main):
    a, b = tmp_path / "a", tmp_path / "b"
    for m, k in ((1, 8), (2, 4), (8, 1)):
        fake_run(a, f"m={m}", m=m, k=k, nll=85.0 + m)
        fake_run(b, f"m={m}", dataset="omniglot", m=m, k=k, nll=100.0 + m)
    res = vaexp_main("report", a, b, f"out={tmp_path / 'rep'}")
    assert res.code == 0, res.err
    assert "differ in dataset" in res.err and "not comparable" in res.err
    pngs = sorted(p.name for p in (tmp_path / "rep").glob("nll_vs_m_*.png"))
    # Short unique names; report.md says which set each name is (the plots' titles say it too).
    assert pngs == ["nll_vs_m_mk8_ctx1.png", "nll_vs_m_mk8_ctx2.png"]
    assert "- `*_ctx1.png`: mnist, burda1" in res.out and "- `*_ctx2.png`: omniglot, burda1" in res.out
    assert "| mnist |" in res.out and "| omniglot |" in res.out      # dataset becomes a column
    runs = {r["run"] for r in read_csv(tmp_path / "rep" / "runs.csv")}
    assert "a/m=1" in runs and "b/m=1" in runs                       # several dirs: prefixed names


def test_other_varying_settings_get_columns(tmp_path, vaexp_main):
    for lr in (1e-3, 3e-4):
        fake_run(tmp_path / "s", f"lr={lr}", lr=lr, nll=85.0 + lr)
    res = vaexp_main("report", tmp_path / "s", "plots=false")
    assert res.code == 0, res.err
    assert "schedule.lr" in res.out.splitlines()[2]
    assert len(read_csv(tmp_path / "s" / "report" / "summary.csv")) == 2


def test_curves_from_tensorboard(tmp_path, vaexp_main):
    from torch.utils.tensorboard import SummaryWriter

    sweep = tmp_path / "s"
    for m, k in ((1, 4), (4, 1)):
        d = fake_run(sweep, f"m={m}", m=m, k=k)
        w = SummaryWriter(log_dir=str(d))
        for step, v in ((10, -100.0), (20, -95.0), (30, -93.0)):
            w.add_scalar("epoch/train_bound", v - m, step)
            w.add_scalar("epoch/valid_bound", v - m - 1, step)
        w.close()
    curves = read_curves(sweep / "m=4")
    assert curves["epoch/train_bound"] == [(10, -104.0), (20, -99.0), (30, -97.0)]
    res = vaexp_main("report", sweep)
    assert res.code == 0, res.err
    assert (sweep / "report" / "curves.png").read_bytes()[:8] == PNG


def test_job_dir_with_commas_and_equals_as_argument(tmp_path, vaexp_main):
    job = fake_run(tmp_path / "s", "k=1,m=2,objective=miwae", m=2, k=1)
    res = vaexp_main("report", job, "plots=false")
    assert res.code == 0, res.err
    assert (job / "report" / "runs.csv").is_file()


@pytest.mark.parametrize("case", ["empty", "missing", "only_unfinished", "only_corrupt", "no_dirs"])
def test_nothing_to_report(case, tmp_path, vaexp_main):
    d = tmp_path / "d"
    d.mkdir()
    if case == "only_unfinished":
        fake_run(d, "a", status="unfinished", epoch=3)
        fake_run(d, "b", status="failed")
    if case == "only_corrupt":
        (fake_run(d, "a") / "metrics.json").write_text("not json")
    args = {"missing": [str(tmp_path / "nope")], "no_dirs": []}.get(case, [str(d)])
    before = sorted(p for p in tmp_path.rglob("*"))
    res = vaexp_main("report", *args)
    assert res.code == 2, (res.out, res.err)
    assert "Traceback" not in res.err
    last = res.err.strip().splitlines()[-1]
    assert last.startswith("vaexp: ")
    words = {"empty": "no vaexp runs under", "missing": "no such directory", "no_dirs": "needs at least one directory",
             "only_unfinished": "no run has finished", "only_corrupt": "no run has finished"}[case]
    assert words in last
    assert sorted(p for p in tmp_path.rglob("*")) == before         # nothing written


def test_unknown_report_option_is_hydras_message(tmp_path, vaexp_main):
    res = vaexp_main("report", str(tmp_path), "outt=x")
    assert res.code != 0 and "Traceback" not in res.err and "outt" in res.err


def test_jvi_runs_report_a_jvi_estimate_never_a_bound(tmp_path, vaexp_main):
    """objective=jvi trains on the JVI estimate (metrics.json train.quantity / train.jvi_estimate):
    its own column in report.md and the CSVs; the train bound column stays for the bounds, and
    diagnostics settings do not split a setting."""
    sweep = tmp_path / "sweep"
    fake_run(sweep, "iwae", objective="iwae", nll=85.0)
    d = fake_run(sweep, "jvi", objective="jvi", nll=84.5, diagnostics={"every": 100, "draws": 10})
    fake_run(sweep, "jvi1", objective="jvi", nll=84.7, seed=1)
    for run, value in ((d, -83.0), (sweep / "jvi1", -83.2)):
        metrics = json.loads((run / "metrics.json").read_text())
        metrics["train"] = {"quantity": "JVI estimate", "jvi_estimate": value, "valid_jvi_estimate": value - 1,
                            "epochs": 3280, "steps": 10, "wall_time_s": 10.0, "device": "cuda"}
        (run / "metrics.json").write_text(json.dumps(metrics))
    res = vaexp_main("report", sweep)
    assert res.code == 0, res.err
    header = [line for line in res.out.splitlines() if line.startswith("| objective")][0]
    assert "train bound" in header and "train JVI estimate" in header and "diagnostics" not in header
    jvi_row = [line for line in res.out.splitlines() if line.startswith("| jvi")][0]
    cells = [c.strip() for c in jvi_row.split("|")]
    assert cells[header.split("|").index(" train JVI estimate ")] == "-83.10 ± 0.14"
    assert cells[header.split("|").index(" train bound ")] == "–"
    rows = {r["objective"]: r for r in read_csv(sweep / "report" / "summary.csv")}
    assert float(rows["jvi"]["train_jvi_estimate_mean"]) == pytest.approx(-83.1)
    assert rows["jvi"]["train_bound_mean"] == "" and float(rows["iwae"]["train_bound_mean"]) == -87.0
    runs = {r["run"]: r for r in read_csv(sweep / "report" / "runs.csv")}
    assert float(runs["jvi"]["valid_jvi_estimate"]) == -84.0 and runs["jvi"]["train_bound"] == ""


def test_a_seed_without_a_finite_nll_is_named_in_its_cell(tmp_path, vaexp_main):
    """metrics.json stores a non-finite NLL as null: the mean is the other seeds', and the cell says so."""
    sweep = tmp_path / "s"
    fake_run(sweep, "a", seed=0, nll=85.0)
    d = fake_run(sweep, "b", seed=1, nll=86.0)
    metrics = json.loads((d / "metrics.json").read_text())
    metrics["evals"][-1]["nll"] = metrics["test"]["nll"] = None
    (d / "metrics.json").write_text(json.dumps(metrics))
    res = vaexp_main("report", sweep, "plots=false")
    assert res.code == 0, res.err
    assert "| 2 (0,1) | 85.00 (1 of 2 seeds finite) |" in res.out
