"""Paired comparisons (vaexp.stats, vaexp.report.compare, `vaexp compare`), published numbers
beside measured ones, importance-weight diagnostics, NLL learning curves, and the report's
labelling (eval columns, hints, one curve per run, short plot names)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from test_report import evaluation, fake_run, read_csv
from vaexp import rundir, stats
from vaexp.evaluate import weight_diagnostics, weight_summary
from vaexp.report import compare, published
from vaexp.report.runs import find_runs, group_runs

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the statistics

# Student's t reference values (two-sided p for |T| >= t; quantiles), from standard tables.
@pytest.mark.parametrize("t, dof, p", [(2.228138852, 10, 0.05), (1.959963985, 1e9, 0.05), (0.0, 5, 1.0),
                                       (12.7062047, 1, 0.05), (3.169272667, 10, 0.01)])
def test_t_distribution_matches_tables(t, dof, p):
    assert stats.t_two_sided_p(t, dof) == pytest.approx(p, abs=1e-7)  # the tables' t have 10 digits


@pytest.mark.parametrize("q, dof, value", [(0.975, 10, 2.228138852), (0.995, 30, 2.749995654), (0.025, 4, -2.776445105)])
def test_t_quantiles_match_tables(q, dof, value):
    assert stats.t_quantile(q, dof) == pytest.approx(value, abs=1e-7)


def test_incomplete_beta_identities():
    assert stats.betainc(1.0, 1.0, 0.3) == pytest.approx(0.3, abs=1e-14)           # the uniform CDF
    assert stats.betainc(2.0, 3.0, 0.4) == pytest.approx(1 - stats.betainc(3.0, 2.0, 0.6), abs=1e-14)
    assert stats.betainc(0.5, 0.5, 0.5) == pytest.approx(0.5, abs=1e-14)           # symmetric: half at the middle


def test_paired_summary_equals_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    d = (torch.randn(200, generator=gen, dtype=torch.float64) * 2.0 + 0.3).tolist()
    r = stats.paired(d)
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (len(d) - 1))
    assert r.n == 200 and r.mean == pytest.approx(mean, abs=1e-12) and r.se == pytest.approx(sd / math.sqrt(200))
    assert r.t == pytest.approx(mean / (sd / math.sqrt(200)))
    half = stats.t_quantile(0.975, 199) * r.se
    assert (r.low, r.high) == pytest.approx((mean - half, mean + half))
    assert r.p == pytest.approx(stats.t_two_sided_p(r.t, 199))
    scipy_stats = pytest.importorskip("scipy.stats")
    ref = scipy_stats.ttest_1samp(d, 0.0)
    assert r.t == pytest.approx(ref.statistic, rel=1e-10) and r.p == pytest.approx(ref.pvalue, rel=1e-8)


def test_paired_needs_two_items_and_handles_no_spread():
    with pytest.raises(ValueError):
        stats.paired([1.0])
    same = stats.paired([0.5, 0.5, 0.5])
    assert same.se == 0.0 and same.p == 0.0 and same.low == same.high == 0.5


# --------------------------------------------------------------------------- comparisons of runs

def with_per_image(d: Path, log_px, l1=None, l64=None, index: int = 0) -> Path:
    """Give a fake run its per-image file (as its evaluation entry names it)."""
    tensors = {"log_px": torch.tensor(log_px, dtype=torch.float64)}
    if l1 is not None:
        tensors["L1"] = torch.tensor(l1, dtype=torch.float64)
    if l64 is not None:
        tensors["L64"] = torch.tensor(l64, dtype=torch.float64)
    torch.save(tensors, d / f"test_log_px.{index}.pt")
    metrics = json.loads((d / "metrics.json").read_text())
    metrics["evals"][-1]["per_example"] = f"test_log_px.{index}.pt"
    (d / "metrics.json").write_text(json.dumps(metrics))
    return d


def images(n: int, seed: int, shift: float = 0.0):
    gen = torch.Generator().manual_seed(seed)
    return (-90.0 + 5.0 * torch.randn(n, generator=gen, dtype=torch.float64) + shift).tolist()


def test_paired_statistics_of_two_runs_and_seed_averaging(tmp_path):
    n = 50
    base = images(n, 0)
    a0 = [v + 0.5 + 0.1 * math.sin(i) for i, v in enumerate(base)]
    a1 = [v + 0.7 + 0.1 * math.cos(i) for i, v in enumerate(base)]
    b0 = list(base)
    runs = [("a0", "iwae", 0, a0), ("a1", "iwae", 1, a1), ("b0", "vae", 0, b0)]
    for name, obj, seed, lp in runs:
        nll = -sum(lp) / n
        d = fake_run(tmp_path / "s", name, objective=obj, seed=seed, nll=nll,
                     evals=[evaluation(nll, seed, settings={"n_test": n})])
        with_per_image(d, lp, l1=[v - 3 for v in lp])
    result = compare.compare([tmp_path / "s"], out=tmp_path / "out")
    (row,) = result["rows"]
    assert "iwae" in row.a.label and "vae" in row.b.label            # A: the lower NLL
    expected = [(x + y) / 2 - z for x, y, z in zip(a0, a1, b0)]     # seeds averaged image by image
    direct = stats.paired(expected)
    got = row.results["log_px"]
    assert got.n == n and got.mean == pytest.approx(direct.mean, abs=1e-12) and got.se == pytest.approx(direct.se)
    assert got.p == pytest.approx(direct.p) and got.low == pytest.approx(direct.low)
    assert row.results["L1"].mean == pytest.approx(direct.mean, abs=1e-12)   # L1 = log p̂ − 3 in both
    assert row.a.seeds == [0, 1] and row.b.seeds == [0]
    table = (tmp_path / "out" / "compare.md").read_text()
    assert f"{direct.mean:+.3f} ± {direct.se:.3f}" in table and "| 50 | 2 / 1 |" in table
    rows = read_csv(tmp_path / "out" / "compare.csv")
    assert float(rows[0]["log_px_diff"]) == pytest.approx(direct.mean, abs=1e-12)


@pytest.mark.parametrize("change, reason", [
    ({"dataset": {"binarize_seed": 99}}, "dataset.binarize_seed"),
    ({"settings": {"n_test": 40}}, "eval.n_test"),
    ({"settings": {"k": 1000}}, "eval.k"),
    ({"settings": {"seed": 3}}, "eval.seed"),
])
def test_incomparable_runs_are_refused_with_the_reason(tmp_path, vaexp_main, change, reason):
    n = 50
    a = fake_run(tmp_path / "s", "a", objective="iwae", nll=85.0, evals=[evaluation(85.0, settings={"n_test": n})])
    with_per_image(a, images(n, 0))
    settings = {"n_test": n, **change.get("settings", {})}
    n_b = settings["n_test"]
    b = fake_run(tmp_path / "s", "b", objective="vae", nll=86.0, evals=[evaluation(86.0, settings=settings)])
    with_per_image(b, images(n_b, 1))
    if "dataset" in change:
        cfg = yaml.safe_load((b / "config.yaml").read_text())
        cfg["dataset"].update(change["dataset"])
        (b / "config.yaml").write_text(yaml.safe_dump(cfg))
    res = vaexp_main("compare", tmp_path / "s")
    assert res.code == 2 and "no two settings are comparable" in res.err and reason in res.err, res.err
    assert "Traceback" not in res.err and not (tmp_path / "s" / "report").exists()


def test_runs_that_scored_other_test_images_are_never_paired(tmp_path, vaexp_main):
    """The same settings, other data files (e.g. omniglot's torchvision split and Burda's, or a
    dataset.path copy): the evaluations' sha256 of the scored images tell them apart. A run
    evaluated before vaexp recorded it (no digest) is compared on its settings, as before."""
    n = 50

    def run(name, objective, nll, digest):
        entry = evaluation(nll, settings={"n_test": n})
        if digest is not None:
            entry["test_images"] = digest
        with_per_image(fake_run(tmp_path / "s", name, objective=objective, nll=nll, evals=[entry]), images(n, int(nll)))

    run("a", "iwae", 85.0, "aa" * 32)
    run("b", "vae", 86.0, "bb" * 32)
    res = vaexp_main("compare", tmp_path / "s")
    assert res.code == 2 and "other test images were scored" in res.err, res.err
    shutil.rmtree(tmp_path / "s")
    run("a", "iwae", 85.0, "aa" * 32)
    run("b", "vae", 86.0, None)
    assert len(compare.compare([tmp_path / "s"], out=tmp_path / "out")["rows"]) == 1


def test_an_evaluation_records_the_digest_of_the_images_it_scored():
    from vaexp.evaluate import test_images_digest

    x = (torch.rand(5, 784, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    y = x.clone()
    y[3, 7] = 1 - y[3, 7]
    assert test_images_digest(x) == test_images_digest(x.clone()) != test_images_digest(y)
    assert len(test_images_digest(x)) == 64


def test_compare_refuses_a_single_setting_and_too_few_runs(tmp_path, vaexp_main):
    fake_run(tmp_path / "one", "a", seed=0)
    res = vaexp_main("compare", tmp_path / "one")
    assert res.code == 2 and "at least two finished runs" in res.err
    fake_run(tmp_path / "one", "b", seed=1)
    res = vaexp_main("compare", tmp_path / "one")
    assert res.code == 2 and "all one setting" in res.err
    assert vaexp_main("compare").code == 2


def test_a_run_without_its_per_image_file_is_left_out_not_fatal(tmp_path):
    n = 30
    for name, obj, shift in (("a", "iwae", 0.2), ("b", "vae", 0.0), ("c", "miwae", 0.1)):
        nll = 85.0 - shift
        d = fake_run(tmp_path / "s", name, objective=obj, nll=nll, evals=[evaluation(nll, settings={"n_test": n})])
        if name != "c":
            with_per_image(d, images(n, 0, shift))
    result = compare.compare([tmp_path / "s"], write=False)
    assert len(result["rows"]) == 1 and any("cannot read the per-image estimates" in x for x in result["notes"])


def test_a_seed_without_its_per_image_file_leaves_its_setting_on_the_other_seeds(tmp_path, vaexp_main):
    n = 30
    for name, obj, seed, shift in (("a0", "iwae", 0, 0.2), ("a1", "iwae", 1, 0.3), ("b0", "vae", 0, 0.0)):
        nll = 85.0 - shift
        d = fake_run(tmp_path / "s", name, objective=obj, seed=seed, nll=nll,
                     evals=[evaluation(nll, seed, settings={"n_test": n})])
        if name != "a1":
            with_per_image(d, images(n, 0, shift))
    result = compare.compare([tmp_path / "s"], write=False)
    (row,) = result["rows"]
    assert row.a.seeds == [0] and "iwae" in row.a.label
    assert any(x.startswith("a1: ") and "compared on its other seeds" in x for x in result["notes"])
    # with no comparable pair left, the reason, not "all one setting"
    (tmp_path / "s" / "b0" / "test_log_px.0.pt").unlink()
    res = vaexp_main("compare", tmp_path / "s")
    assert res.code == 2 and "fewer than two settings can be compared" in res.err and "b0: " in res.err, res.err
    res = vaexp_main("report", tmp_path / "s", "plots=false")
    assert res.code == 0, res.err
    section = (tmp_path / "s" / "report" / "report.md").read_text().split("## Paired comparisons")[1]
    assert "No comparable pair of settings." in section and "b0: " in section


def test_compare_counts_a_copied_run_once(tmp_path):
    n = 30
    for name, obj, seed, shift in (("a0", "iwae", 0, 0.2), ("a1", "iwae", 1, 0.4), ("b0", "vae", 0, 0.0)):
        nll = 85.0 - shift
        d = fake_run(tmp_path / "s", name, objective=obj, seed=seed, nll=nll,
                     evals=[evaluation(nll, seed, settings={"n_test": n})])
        with_per_image(d, images(n, 0, shift))
    once = compare.compare([tmp_path / "s"], write=False)["rows"][0].results["log_px"]
    shutil.copytree(tmp_path / "s" / "a0", tmp_path / "s" / "a0-copy")
    result = compare.compare([tmp_path / "s"], write=False)
    (row,) = result["rows"]
    assert row.a.seeds == [0, 1] and row.results["log_px"].mean == pytest.approx(once.mean, abs=1e-12)
    assert any("a0-copy repeats a0" in x and "counted once" in x for x in result["notes"])


def test_the_report_has_the_paired_section_and_its_csv(tmp_path, vaexp_main):
    n = 20
    for name, obj, shift in (("a", "iwae", 0.4), ("b", "vae", 0.0)):
        nll = 85.0 - shift
        d = fake_run(tmp_path / "s", name, objective=obj, nll=nll, evals=[evaluation(nll, settings={"n_test": n})])
        with_per_image(d, images(n, 0, shift))
    res = vaexp_main("report", tmp_path / "s")
    assert res.code == 0, res.err
    assert "## Paired comparisons (per test image)" in res.out and "+0.400 ± 0.000" in res.out
    assert (tmp_path / "s" / "report" / "compare.csv").is_file()


# --------------------------------------------------------------------------- published numbers

def test_every_published_file_is_a_preset_and_loads():
    presets = {p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")}
    cells = published.load()
    assert {c.preset for c in cells} <= presets and {"iwae_table1", "rainforth_mk64"} <= {c.preset for c in cells}
    for c in cells:
        assert c.source and c.what and c.nll > 0 and "eval.k" in c.settings
    table1 = {(c.settings["model.name"], c.settings["objective.name"], c.settings["k"]): c
              for c in cells if c.preset == "iwae_table1"}
    assert len(table1) == 12 and table1[("burda1", "iwae", 50)].nll == 84.78
    assert table1[("burda2", "iwae", 50)].active_units == [26, 7]
    piwae = next(c for c in cells if c.preset == "rainforth_mk64" and c.settings["objective.name"] == "piwae")
    assert (piwae.nll, piwae.spread, piwae.settings["m"], piwae.settings["k"]) == (84.46, 0.06, 8, 8)


def test_published_columns_appear_for_matching_runs(tmp_path, vaexp_main):
    sweep = tmp_path / "s"
    # IWAE Table 1, burda1 iwae k=50 (published 84.78, no spread): two seeds, and an off-protocol run.
    for seed, nll in ((0, 85.1), (1, 85.3)):
        fake_run(sweep, f"iwae50-{seed}", objective="iwae", k=50, seed=seed, nll=nll)
    fake_run(sweep, "quick", objective="iwae", k=5, nll=99.0)  # k=5 on another schedule name below
    cfg = yaml.safe_load((sweep / "quick" / "config.yaml").read_text())
    cfg["schedule"]["name"] = "quick"
    (sweep / "quick" / "config.yaml").write_text(yaml.safe_dump(cfg))
    # Rainforth et al., PIWAE(8, 8): 84.46 ± 0.06.
    fake_run(sweep, "piwae", objective="piwae", m=8, k=8, nll=84.50)
    # burda1 and schedule=burda by name, but not the options as the papers ran them: no cell.
    for name, group, key, value in (("short", "schedule", "stages", 1), ("narrow", "model", "hidden", [100])):
        fake_run(sweep, name, objective="iwae", k=50, nll=120.0)
        cfg = yaml.safe_load((sweep / name / "config.yaml").read_text())
        cfg[group][key] = value
        (sweep / name / "config.yaml").write_text(yaml.safe_dump(cfg))
    res = vaexp_main("report", sweep)
    assert res.code == 0, res.err
    assert "## Published numbers" in res.out
    mean, sd = 85.2, math.sqrt(0.02)
    se = sd / math.sqrt(2)
    assert f"| burda1 iwae m=1 k=50 | 84.78 | {mean:.2f} ± {se:.2f} (n=2) | {mean - 84.78:+.2f} | no |" in res.out
    assert "| burda1 piwae m=8 k=8 | 84.46 ± 0.06 | 84.50 ± 0.30 (n=1) | +0.04 | yes |" in res.out
    published_rows = res.out.split("## Published numbers")[1].split("\n\n")[1]
    assert "m=1 k=5 |" not in published_rows   # the quick run: no cell
    assert "120.00" not in published_rows and published_rows.count("| burda1 iwae m=1 k=50 |") == 1
    rows = {(r["objective"], r["k"]): r for r in read_csv(sweep / "report" / "summary.csv")}
    assert float(rows[("iwae", "50")]["published_nll"]) == 84.78
    assert rows[("iwae", "50")]["published_within"] == "false" and rows[("piwae", "8")]["published_within"] == "true"
    assert rows[("iwae", "5")]["published_nll"] == ""


# --------------------------------------------------------------------------- importance-weight diagnostics

def test_ess_is_the_definition_on_hand_made_weights():
    k = 7
    equal = torch.zeros(k, 1, dtype=torch.float64)
    ess, top = weight_diagnostics(equal - 123.0)
    assert ess.item() == pytest.approx(k) and top.item() == pytest.approx(1 / k)
    dominant = torch.tensor([[0.0], [-800.0], [-900.0], [-1000.0]], dtype=torch.float64)
    ess, top = weight_diagnostics(dominant)
    assert ess.item() == pytest.approx(1.0) and top.item() == pytest.approx(1.0)
    lw = torch.randn(50, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3 - 200
    w = torch.softmax(lw, 0)
    ess, top = weight_diagnostics(lw)
    assert torch.allclose(ess, 1 / (w ** 2).sum(0)) and torch.allclose(top, w.max(0).values)
    summary = weight_summary(torch.tensor([1.0, 5.0, 20.0, 40.0], dtype=torch.float64),
                             torch.tensor([0.9, 0.5, 0.1, 0.05], dtype=torch.float64))
    assert summary == pytest.approx({"ess_mean": 16.5, "ess_median": 5.0, "ess_below_10": 0.5,
                                     "max_weight_mean": 0.3875, "max_weight_median": 0.1})


def test_a_run_records_weight_diagnostics_and_its_nll_curve(vaexp_main, tiny_args, tmp_path):
    run = tmp_path / "run"
    res = vaexp_main("train", *tiny_args, "schedule.epochs=3", "eval.every=1", f"hydra.run.dir={run}")
    assert res.code == 0, res.err
    assert "ESS mean" in res.out
    metrics = json.loads((run / "metrics.json").read_text())
    test = metrics["test"]
    assert {"ess_mean", "ess_median", "ess_below_10", "max_weight_mean", "max_weight_median"} <= set(test)
    assert 1.0 <= test["ess_median"] <= test["k"] and 0.0 <= test["ess_below_10"] <= 1.0
    assert isinstance(test["test_images"], str) and len(test["test_images"]) == 64   # what it scored
    per_image = torch.load(run / metrics["evals"][-1]["per_example"])
    assert torch.allclose(per_image["ess"].mean(), torch.tensor(test["ess_mean"], dtype=torch.float64))
    assert [p["epoch"] for p in metrics["curve"]] == [1, 2]       # eval.every=1 before the final evaluation
    assert all(p["k"] == test["k"] and p["n_test"] == test["n_test"] for p in metrics["curve"])
    res = vaexp_main("report", run, f"out={tmp_path / 'rep'}")
    assert res.code == 0, res.err
    assert (tmp_path / "rep" / "nll_curves.png").is_file() and "ESS median" in res.out


def test_a_curve_point_replaces_those_of_a_lost_future(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    for epoch in (1, 2, 3):
        rundir.record_curve_point(d, {"epoch": epoch, "nll": 100.0 - epoch})
    rundir.record_curve_point(d, {"epoch": 2, "nll": 50.0})  # resumed from the epoch-1 checkpoint
    curve = json.loads((d / "metrics.json").read_text())["curve"]
    assert [(p["epoch"], p["nll"]) for p in curve] == [(1, 99.0), (2, 50.0)]


def test_the_neg_kl_column_is_the_gap_of_l64_and_log_px(tmp_path, vaexp_main):
    fake_run(tmp_path / "s", "a", nll=85.0)   # L64 = -86.0 in the fixture: -KL = L64 - log p = -1.0
    res = vaexp_main("report", tmp_path / "s")
    assert res.code == 0, res.err
    header = next(line for line in res.out.splitlines() if line.startswith("| objective"))
    assert "−KL(Q‖P)" in header
    row = next(line for line in res.out.splitlines() if line.startswith("| miwae"))
    assert row.split(" | ")[header.split(" | ").index("−KL(Q‖P)")] == "-1.00"


# --------------------------------------------------------------------------- the report's labelling

def test_differing_eval_settings_get_columns_and_separate_rows(tmp_path, vaexp_main):
    fake_run(tmp_path / "s", "full", seed=0, nll=85.0)
    fake_run(tmp_path / "s", "part", seed=1, nll=84.0, evals=[evaluation(84.0, 1, settings={"n_test": 500})])
    res = vaexp_main("report", tmp_path / "s")
    assert res.code == 0, res.err
    header = next(line for line in res.out.splitlines() if line.startswith("| objective"))
    assert "eval.n_test" in header
    rows = [line for line in res.out.splitlines() if line.startswith("| miwae")]
    assert len(rows) == 2 and any("| 500 |" in r for r in rows) and any("| 10000 |" in r for r in rows)
    assert "on 500, 10000 test images" in res.out


def test_unfinished_runs_get_the_command_that_finishes_them(tmp_path, vaexp_main):
    fake_run(tmp_path / "s", "done", nll=85.0)
    fake_run(tmp_path / "s", "stopped", seed=1, status="none", epoch=7)
    trained = fake_run(tmp_path / "s", "trained", seed=2, evals=[], run={"state": "trained", "epoch": 3280,
                                                                          "global_step": 9774400, "epochs": 3280})
    res = vaexp_main("report", tmp_path / "s")
    assert res.code == 0, res.err
    assert f"to finish it: `vaexp train resume={tmp_path / 's' / 'stopped'}`" in res.out
    assert f"to finish it: `vaexp eval {trained}`" in res.out
    runs = {r["run"]: r for r in read_csv(tmp_path / "s" / "report" / "runs.csv")}
    assert runs["stopped"]["hint"].startswith("vaexp train resume=")


def test_every_run_gets_its_own_training_curve_and_legend_entry(tmp_path):
    from vaexp.report import plots

    for seed in (0, 1):
        fake_run(tmp_path / "s", f"seed{seed}", seed=seed)
    runs, _ = find_runs([tmp_path / "s"])
    labels = [plots.curve_label(r) for r in sorted(runs, key=lambda r: r.flat["seed"])]
    assert len(set(labels)) == 2 and "seed=0" in labels[0] and "seed=1" in labels[1]
    (group,) = group_runs(runs)
    assert len(group.runs) == 2


def test_unfinished_runs_join_the_training_curves_of_their_setting(tmp_path):
    """A finished run's eval.n_test is the evaluated count, an unfinished one's as configured
    (null): the curves (which do not depend on eval.*) still put them together, labelled by status."""
    from vaexp.report import plots

    fake_run(tmp_path / "s", "done", seed=0)
    fake_run(tmp_path / "s", "stopped", seed=1, status="unfinished", epoch=2)
    runs, _ = find_runs([tmp_path / "s"])
    done, stopped = sorted(runs, key=lambda r: r.name)
    assert done.context != stopped.context and done.training_context == stopped.training_context
    assert plots.curve_label(stopped).endswith("seed=1 (unfinished)") and plots.curve_label(done).endswith("seed=0")


def test_labels_write_list_settings_as_the_report_tables_do():
    from types import SimpleNamespace

    from vaexp.report.compare import _label
    from vaexp.report.tables import fmt_value

    run = SimpleNamespace(flat={"objective.name": "iwae", "m": 1, "k": 5, "estimator.name": "reparam",
                                "model.hidden": (200,), "schedule.lr": 0.001})
    label = _label(run, ["model.hidden", "schedule.lr"])
    assert label == "iwae m=1 k=5 reparam model.hidden=[200] schedule.lr=0.001"
    assert fmt_value((200,)) == "[200]"
