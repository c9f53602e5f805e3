"""`vaexp snr`: the batched gradient draws, the statistics, the theory it must reproduce, the CLI.

The acceptance test measures Rainforth et al.'s setting (the linear-Gaussian model, D = 20, σ² = 2/3,
at the optimum for N = 1024 points perturbed by N(0, 0.01²), one training point) and asserts the
slopes of log SNR within ±0.15 of theory: reparam IWAE +1/2 (θ) and −1/2 (φ) in K, +1/2 in M for
both; DReG's φ slope in K positive. Why this grid and R: the reparam φ SNR is ≈ 0.07 at K = 1 and
falls like K^(-1/2); an SNR estimated from R draws reads |s + Z/√R|, so s√R must stay ≳ 3 at the
largest K for the estimate to be unbiased to a few per cent. K ≤ 16 with R = 40,000 gives s√R ≈ 4
there, in ~5-10 s of CPU. This test's seeds give θ_K +0.45, φ_K −0.47, M +0.51 / +0.49, DReG φ_K
+0.14. Over 4 other perturbation/draw seeds the mean-over-parameters slopes were θ_K 0.435–0.453,
φ_K −0.429 to −0.444, M 0.495–0.510 for both, DReG φ_K 0.124–0.158: the K slopes sit ~0.05
inside ±1/2 because K = 1, 2 are not yet asymptotic, and the spread across seeds is ±0.01, so
the ±0.15 band has ≥ 0.08 of margin either way. (With K up to 64 and R = 100,000 the slopes are
+0.46 and −0.47; README.md shows that run.)
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import yaml

from vaexp.estimators import get_estimator, gradients, surrogate_losses
from vaexp.models.burda import VAE
from vaexp.models.gaussian import LinearGaussianVAE
from vaexp.objectives import make_objective
from vaexp.snr import (ALL, PHI, THETA, GradientSampler, Moments, Row, fit_slopes, grid_cells,
                       per_parameter_snr, summarise)

from conftest import run_cli

F64 = torch.float64
ESTIMATORS = ["reparam", "stl", "dreg"]
TOL = 0.15

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- the batched draws are the trainer's gradients, draw by draw ----------------------------------------

def _models():
    torch.manual_seed(0)
    lg = LinearGaussianVAE(3, 2, q_var=0.8, learn_q_var=True).double()
    burda2 = VAE([3, 2], [4, 3], depth=2, activation="tanh", x_dim=6).double()
    for model in (lg, burda2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return {"gaussian2": (lg, torch.randn(2, 3, dtype=F64)),
            "burda2": (burda2, torch.tensor([[1, 0, 1, 1, 0, 0], [0, 0, 1, 0, 1, 1]], dtype=F64))}


def _assert_draws_are_the_trainers(model, x, obj, ests, m, k, n, seed, g_theta, g_phi, monkeypatch):
    """Draw r of n (ε: generator `seed`, [n, M, K, B, D] per layer, sliced at r) fed to the plain
    model gives exactly the trainer's gradients (surrogate_losses + gradients) for θ and every φ."""
    gen = torch.Generator().manual_seed(seed)
    layer_eps = [torch.randn((n, m, k, x.shape[0], d), generator=gen, dtype=F64) for d in model.latents]
    real_randn = torch.randn
    for r in range(n):
        for e, est in enumerate(ests):
            queue = [eps[r] for eps in layer_eps]
            monkeypatch.setattr(torch, "randn", lambda *a, **kw: queue.pop(0))
            lws = model.log_weights(x, m, k, need_bar=est.needs_lw_bar, need_score=est.needs_score)
            monkeypatch.setattr(torch, "randn", real_randn)
            gt, gp = gradients(surrogate_losses(obj, est, lws.lw, lws.lw_bar, lws.log_q_score),
                               model.theta_parameters(), model.phi_parameters())
            torch.testing.assert_close(g_theta[r], torch.cat([g.reshape(-1) for g in gt]), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(g_phi[e][r], torch.cat([g.reshape(-1) for g in gp]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("objective", ["piwae", "ciwae"])
@pytest.mark.parametrize("name", ["gaussian2", "burda2"])
def test_batched_draws_equal_the_trainers_gradients(name, objective, monkeypatch):
    """vmap with randomness='different' draws ε for all n draws at once ([n, M, K, B, D] per
    layer, from the same generator); feeding draw r's slice to the plain model must give exactly
    the gradients of surrogate_losses + gradients (the trainer's path), for θ and every φ."""
    model, x = _models()[name]
    m, k, n = 2, 3, 4
    obj, ests = make_objective(objective, beta=0.3), [get_estimator(e) for e in ESTIMATORS]
    sampler = GradientSampler(model, x, obj, ests)
    g_theta, g_phi = sampler.draw(m, k, n, torch.Generator().manual_seed(5))
    assert g_theta.shape == (n, sampler.sizes[0]) and len(g_phi) == 3

    _assert_draws_are_the_trainers(model, x, obj, ests, m, k, n, 5, g_theta, g_phi, monkeypatch)
    # the draws are independent, not copies
    assert (g_theta[0] - g_theta[1]).abs().max() > 1e-3


# -- statistics -----------------------------------------------------------------------------------------

def test_moments_merge_chunks_exactly():
    g = torch.randn(1000, 7, generator=torch.Generator().manual_seed(0), dtype=F64) * 3 + 1
    mom = Moments()
    for chunk in torch.split(g, [1, 300, 2, 697]):
        mom.add(chunk)
    torch.testing.assert_close(mom.mean, g.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mom.std(), g.std(0), rtol=1e-12, atol=1e-12)


def test_snr_leaves_dead_and_deterministic_parameters_out_of_the_summaries():
    mean = torch.tensor([1.0, -2.0, 0.0, 3.0, 0.0])
    std = torch.tensor([2.0, 1.0, 1.0, 0.0, 0.0])
    snr = per_parameter_snr(mean, std)
    assert snr[:3].tolist() == [0.5, 2.0, 0.0] and math.isinf(snr[3]) and math.isnan(snr[4])
    s = summarise(snr)
    assert s == {"mean": pytest.approx(2.5 / 3), "median": 0.5, "params": 5, "excluded": 2}


def test_the_noise_floor_is_the_snr_of_pure_noise():
    """The table marks SNRs below noise_floor(R): a zero-mean gradient's estimated SNR over R draws
    is |mean|/std ≈ |N(0, 1/R)|, whose mean is √(2/π)/√R. 20,000 pure-noise parameters over R = 400
    draws (the mean's Monte Carlo error ~0.5%), against a 3% tolerance."""
    from vaexp.snr import noise_floor

    draws = torch.randn(400, 20000, generator=torch.Generator().manual_seed(0), dtype=F64)
    measured = per_parameter_snr(draws.mean(0), draws.std(0)).mean().item()
    assert noise_floor(400) == pytest.approx(math.sqrt(2 / math.pi) / 20, rel=1e-12)
    assert measured == pytest.approx(noise_floor(400), rel=0.03)


@pytest.mark.parametrize("mode", ["axes", "cross"])
def test_fit_slopes_recovers_power_laws(mode):
    cells = grid_cells([1, 10, 100], [1, 4, 16], mode)
    rows = [Row(ALL, THETA, m, k, 10, 3.0 * k ** 0.5 * m ** 0.5, 2.0 * k ** 0.4 * m ** 0.5, 1, 0) for m, k in cells]
    rows += [Row("reparam", PHI, m, k, 10, 0.1 * k ** -0.5 * m ** 0.5, 0.1, 1, 0) for m, k in cells]
    slopes = fit_slopes(rows, "mean")
    assert slopes[(ALL, THETA)] == (pytest.approx(0.5), pytest.approx(0.5))
    assert slopes[("reparam", PHI)] == (pytest.approx(-0.5), pytest.approx(0.5))
    assert fit_slopes(rows, "median")[(ALL, THETA)] == (pytest.approx(0.4), pytest.approx(0.5))
    only_k = fit_slopes([r for r in rows if r.m == 1], "mean")[(ALL, THETA)]
    assert only_k[0] == pytest.approx(0.5) and math.isnan(only_k[1])


def test_grid_cells():
    assert grid_cells([1, 4, 4], [1, 2], "axes") == [(1, 1), (1, 4), (2, 1)]
    assert grid_cells([1, 4], [2, 3], "axes") == [(2, 1), (2, 4), (3, 1)]
    assert grid_cells([1, 4], [1, 2], "cross") == [(1, 1), (1, 4), (2, 1), (2, 4)]


# -- acceptance: Rainforth et al.'s theory, measured through the command ---------------------------------

def read_rows(path: Path):
    with open(path) as f:
        return [Row(r["estimator"], r["network"], int(r["m"]), int(r["k"]), int(r["draws"]), float(r["snr_mean"]),
                    float(r["snr_median"]), int(r["params"]), int(r["excluded"])) for r in csv.DictReader(f)]


def test_snr_slopes_match_theory_at_rainforths_setting(vaexp_main, tmp_path):
    out = tmp_path / "out"
    res = vaexp_main("snr", "draws=40000", "k=[1,2,4,8,16]", "m=[1,4,16]", "estimators=[reparam,dreg]",
                     "progress=false", f"out_root={out}")
    assert res.code == 0, res.err
    (run,) = (out / "snr").iterdir()
    assert run.name.endswith("_gaussian_gaussian_iwae")
    for name in ("snr.csv", "snr.txt", "config.yaml"):
        assert (run / name).is_file()
    assert (run / "snr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(run.glob("events.out.tfevents.*"))
    assert "dlogSNR/dlogK" in res.out and "perturbed by N(0, 0.01^2)" in res.out

    rows = read_rows(run / "snr.csv")
    assert {(r.estimator, r.network) for r in rows} == {(ALL, THETA), ("reparam", PHI), ("dreg", PHI)}
    assert all(r.params == (20 if r.network == THETA else 420) and r.excluded == 0 for r in rows)
    slopes = fit_slopes(rows, "mean")
    theta_k, theta_m = slopes[(ALL, THETA)]
    phi_k, phi_m = slopes[("reparam", PHI)]
    dreg_k, dreg_m = slopes[("dreg", PHI)]
    assert abs(theta_k - 0.5) < TOL, slopes
    assert abs(phi_k + 0.5) < TOL, slopes
    assert abs(theta_m - 0.5) < TOL and abs(phi_m - 0.5) < TOL, slopes
    assert dreg_k > 0.05, slopes  # DReG's φ SNR grows with K (Tucker et al.)
    # the same draws feed both φ estimators: at K = 1 DReG is STL, whose SNR beats reparam's
    k1 = {r.estimator: r.mean for r in rows if r.network == PHI and (r.m, r.k) == (1, 1)}
    assert k1["dreg"] > 2 * k1["reparam"]


# -- a trained run's checkpoint --------------------------------------------------------------------------

def test_snr_on_a_checkpoint(vaexp_main, tmp_path, tiny_args):
    out = tmp_path / "out"
    assert vaexp_main("train", *tiny_args, f"out_root={out}").code == 0
    (run,) = (out / "train").iterdir()
    res = vaexp_main("snr", str(run), "k=[1,4]", "m=[1,2]", "draws=30", "batch=2", "objective=miwae",
                     "progress=false", f"out_root={out}")
    assert res.code == 0, res.err
    (snr_dir,) = (out / "snr").iterdir()
    assert snr_dir.name.endswith(f"_{run.name}_miwae")
    assert "synthetic, burda1" in res.out
    rows = read_rows(snr_dir / "snr.csv")
    cells = {(r.m, r.k) for r in rows}
    assert cells == {(1, 1), (1, 4), (2, 1)}
    model = VAE([4], [8], x_dim=784)
    n_theta = sum(p.numel() for p in model.theta_parameters())
    n_phi = sum(p.numel() for p in model.phi_parameters())
    assert {r.params for r in rows if r.network == THETA} == {n_theta}
    assert {r.params for r in rows if r.network == PHI} == {n_phi}
    assert all(math.isfinite(r.mean) and r.mean > 0 for r in rows)
    # config.yaml records what was measured: the run's model and dataset, not snr's defaults
    # (gaussian), and no perturbation (it applies only to the analytic model)
    recorded = yaml.safe_load((snr_dir / "config.yaml").read_text())
    assert recorded["model"]["name"] == "burda1" and recorded["model"]["latents"] == [4]
    assert recorded["model"]["hidden"] == [8]
    assert recorded["dataset"]["name"] == "synthetic" and recorded["dataset"]["n_train"] == 120
    assert recorded["perturb"] is None
    assert recorded["run"] == str(run) and recorded["objective"]["name"] == "miwae" and recorded["k"] == [1, 4]


RUN_FIXES = [
    (["dataset=mnist", "model=burda2"], ["dataset=mnist model=burda2 with run=", "(model=burda1, dataset=synthetic)",
                                         "they would be ignored", "drop them", "omit run="]),
    (["model=gaussian", "dataset=gaussian"], ["model=gaussian dataset=gaussian with run=", "drop them"]),
    (["model.latents=[3]"], ["model.latents=[3] with run=", "it would be ignored", "drop it"]),
    (["dataset.n_valid=5"], ["dataset.n_valid=5 with run=", "(model=burda1, dataset=synthetic)"]),
    # a key snr's default dataset=gaussian lacks (Hydra alone would say "no setting path")
    (["dataset.path=/data"], ["dataset.path=/data with run=", "(model=burda1, dataset=synthetic)", "drop it"]),
    (["perturb=0.5"], ["perturb=0.5 with run=", "perturb only moves the analytic model", "drop it", "omit run="]),
]


def test_snr_refuses_settings_the_run_fixes(vaexp_main, tmp_path, tiny_args):
    """With run=, snr measures the run's checkpoint on its own model and dataset: a model=,
    dataset= (or one of their keys) or perturb= on the same command line would be ignored, so it is
    refused in one line (exit 2) before any directory exists; what snr uses with run= is allowed."""
    out = tmp_path / "out"
    assert vaexp_main("train", *tiny_args, f"out_root={out}").code == 0
    (run,) = (out / "train").iterdir()
    for overrides, words in RUN_FIXES:
        res = vaexp_main("snr", f"run={run}", *overrides, "draws=3", "k=[2]", "m=[1]", "progress=false",
                         f"out_root={out}")
        assert res.code == 2, (overrides, res.err)
        assert "Traceback" not in res.out + res.err
        lines = [line for line in res.err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("vaexp: "), res.err
        for word in words:
            assert word in lines[0], lines[0]
        assert not (out / "snr").exists(), overrides
    res = vaexp_main("snr", "-m", f"run={run}", "perturb=0.1,0.2", "draws=3", "k=[2]", "m=[1]", "progress=false",
                     f"out_root={out}")
    assert res.code == 2 and "perturb=0.1,0.2 with run=" in res.err, res.err
    assert not (out / "multirun").exists() and not (out / "snr").exists()
    res = vaexp_main("snr", str(run), "draws=3", "m=[1]", "seed=3", "index=1", "estimators=[dreg]",
                     "objective=vae", "k=[1]", "progress=false", f"out_root={out}")
    assert res.code == 0, res.err


# -- bad input: one line, non-zero exit, nothing written ------------------------------------------------

BAD_SNR = [
    (["k=[0,4]"], ["k=[0, 4]", ">= 1"]),
    (["m=[1,0]"], ["m=[1, 0]"]),
    (["k=[]"], ["k=[]"]),
    (["draws=1"], ["draws=1", "at least 2"]),
    (["estimators=[reparam,foo]"], ["estimators"]),
    (["run={tmp}/nowhere"], ["config.yaml"]),
    (["run={tmp}/no_ckpt"], ["checkpoint.pt"]),
    (["model=gaussian", "dataset=mnist"], ["model=gaussian with dataset=mnist", "dataset=gaussian"]),
    (["model=burda1"], ["model=burda1 without run="]),
    (["model=gaussian", "model.latents=[5]"], ["model.latents=[5]", "dataset.dim=20"]),
    (["index=1024"], ["index=1024"]),
    (["batch=0"], ["batch=0"]),
]


@pytest.mark.parametrize("overrides,words", BAD_SNR)
def test_bad_snr_input(overrides, words, vaexp_main, tmp_path):
    (tmp_path / "no_ckpt").mkdir()
    (tmp_path / "no_ckpt" / "config.yaml").write_text("seed: 0\n")
    out = tmp_path / "out"
    res = vaexp_main("snr", *[o.replace("{tmp}", str(tmp_path)) for o in overrides], f"out_root={out}")
    assert res.code != 0
    assert "Traceback" not in res.out + res.err
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vaexp: "), res.err
    for word in words:
        assert word in lines[0], lines[0]
    assert not out.exists()


@pytest.mark.parametrize("overrides,words", [
    (["model=gaussian"], ["model=gaussian with dataset=mnist"]),
    (["dataset=gaussian"], ["dataset=gaussian with model=burda1", "model=gaussian"]),
    (["model=gaussian", "dataset=gaussian", "model.latents=[20,5]"], ["model.latents=[20, 5]"]),
    (["model=gaussian", "dataset=gaussian", "model.q_var=0"], ["model.q_var=0"]),
])
def test_bad_train_input_for_the_gaussian_model(overrides, words, vaexp_main, tmp_path):
    out = tmp_path / "out"
    res = vaexp_main("train", *overrides, f"out_root={out}")
    assert res.code != 0 and "Traceback" not in res.out + res.err
    for word in words:
        assert word in res.err
    assert not out.exists()


def test_bad_snr_input_exit_status_in_a_real_process(tmp_path, data_dir):
    res = run_cli(["snr", "draws=1", f"out_root={tmp_path / 'out'}"], tmp_path, data_dir)
    assert res.code == 2 and "Traceback" not in res.err
    assert res.err.strip().splitlines() == [res.err.strip()] and "draws=1" in res.err
    assert not (tmp_path / "out").exists()


# -- the rest of the family: the same draws, the bias column ----------------------------------------------

NEW = ["rws", "rws_dreg", "gdreg", "vimco", "dreg_norm"]


@pytest.mark.parametrize("name", ["gaussian2", "burda2"])
def test_batched_draws_of_the_new_estimators_equal_the_trainers(name, monkeypatch):
    """As above, for the estimators that need log q at the stopped samples (rws, vimco) and the
    jackknife objective: draw r's slice through the plain model equals the trainer's gradients."""
    model, x = _models()[name]
    m, k, n = 2, 3, 3
    for objective, names in (("miwae", NEW), ("jvi", ["rws", "vimco", "dreg"])):
        obj, ests = make_objective(objective), [get_estimator(e) for e in names]
        sampler = GradientSampler(model, x, obj, ests)
        assert sampler.need_score
        g_theta, g_phi = sampler.draw(m, k, n, torch.Generator().manual_seed(6))
        _assert_draws_are_the_trainers(model, x, obj, ests, m, k, n, 6, g_theta, g_phi, monkeypatch)


def test_snr_command_with_the_new_estimators_and_the_bias_column(vaexp_main, tmp_path):
    """reparam not listed: drawn anyway as the bias reference, and given no row. vimco is unbiased
    for the bound's gradient (z small), rws is not (it estimates the wake-phi direction)."""
    out = tmp_path / "out"
    res = vaexp_main("snr", "draws=4000", "k=[2,4]", "m=[1]", "estimators=[rws,vimco,gdreg]", "alpha=0.3",
                     "dataset.dim=5", "model.latents=[5]", "perturb=0.3", "progress=false", f"out_root={out}")
    assert res.code == 0, res.err
    (run,) = (out / "snr").iterdir()
    rows = read_rows(run / "snr.csv")
    assert {(r.estimator, r.network) for r in rows} == {(ALL, THETA), ("rws", PHI), ("vimco", PHI), ("gdreg", PHI)}
    with open(run / "snr.csv") as f:
        bias = {(r["estimator"], int(r["k"])): float(r["bias_z"]) for r in csv.DictReader(f)}
    assert all(math.isnan(v) for (e, _), v in bias.items() if e == ALL)
    for k in (2, 4):
        assert bias[("vimco", k)] < 4, bias
        assert bias[("rws", k)] > 10 and bias[("gdreg", k)] > 4, bias
    text = (run / "snr.txt").read_text()
    assert "bias of the mean phi gradient against reparam's" in text and "gdreg: alpha=0.3" in text


@pytest.mark.parametrize("overrides,words", [
    (["estimators=[vimco]", "k=[1,4]"], ["estimators=[...vimco...] with objective=iwae k=1", "k >= 2"]),
    (["estimators=[rws]", "objective=vae"], ["rws", "objective=vae", "plain mean"]),
    (["objective=jvi", "k=[1,2]"], ["objective=jvi with k=1"]),
    (["estimators=[gdreg]", "alpha=2"], ["alpha=2"]),
])
def test_snr_refuses_undefined_combinations(overrides, words, vaexp_main, tmp_path):
    out = tmp_path / "out"
    res = vaexp_main("snr", *overrides, f"out_root={out}")
    assert res.code != 0 and "Traceback" not in res.out + res.err
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert len(lines) == 1, res.err
    for word in words:
        assert word in lines[0], lines[0]
    assert not out.exists()
