"""vaexp.evaluate: log p(x) with K importance samples, L_k from the same samples, active units,
and the printed table."""
from __future__ import annotations

import math
from typing import List

import pytest
import torch
from omegaconf import OmegaConf

from vaexp import evaluate as ev
from vaexp.models import likelihood
from vaexp.schema import EvalConf
from vaexp.evaluate import DEFAULT_ROWS, active_units, evaluate, format_table, log_likelihoods
from vaexp.models.base import LogWeights
from vaexp.models.burda import VAE

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def binary_ids(n: int, dim: int) -> torch.Tensor:
    """n distinct binary rows (example i is i in binary), so a fake model can tell examples apart."""
    bits = (torch.arange(n).unsqueeze(1) >> torch.arange(dim)) & 1
    return bits.float()


class FakeLogWeights:
    """Stands in for VAE.log_weights: returns known log-weights table[example, sample].

    Samples are handed out in order per example, however log_likelihoods splits the work into
    chunks of examples and pieces of samples; every (example, sample) must be asked for once.
    """

    def __init__(self, x: torch.Tensor, table: torch.Tensor):
        self.x, self.table = x, table
        self.ids, self.offset = None, 0
        self.used = torch.zeros(table.shape, dtype=torch.long)
        self.calls: List[tuple] = []

    def __call__(self, xb, m, k, need_bar=False, generator=None):
        assert m == 1 and generator is not None
        ids = [int((self.x == row).all(1).nonzero()) for row in xb]
        if ids != self.ids:
            self.ids, self.offset = ids, 0
        cols = slice(self.offset, self.offset + k)
        self.used[ids, cols] += 1
        self.offset += k
        self.calls.append((len(ids), k))
        return LogWeights(self.table[ids, cols].T.unsqueeze(0), None, [])


def reference(table: torch.Tensor, kk: int) -> torch.Tensor:
    t = table.double()
    groups = t.shape[1] // kk
    g = t[:, : groups * kk].reshape(t.shape[0], groups, kk)
    return (torch.logsumexp(g, 2) - math.log(kk)).mean(1)


@pytest.mark.parametrize("rows", [1, 3, 7, 10, 12, 25, 10_000])
def test_log_likelihoods_combines_known_log_weights(rows, monkeypatch):
    n, K = 9, 12
    x = binary_ids(n, 6)
    gen = torch.Generator().manual_seed(0)
    # Around -1000 in fp32: a naive log(mean(exp(lw))) would give -inf.
    table = (-1000 + 5 * torch.randn(n, K, generator=gen)).float()
    model = VAE([3], [5], x_dim=6)
    fake = FakeLogWeights(x, table)
    monkeypatch.setattr(model, "log_weights", fake)

    out = log_likelihoods(model, x, K, [1, 3, 4, 5, 6], rows, seed=1)

    assert torch.equal(fake.used, torch.ones(n, K, dtype=torch.long))  # every sample once, none twice
    assert all(b * k <= rows for b, k in fake.calls)  # pieces respect the row budget
    assert set(out) == {"log_px", "L1", "L3", "L4", "L5", "L6", "ess", "max_weight"}
    w = torch.softmax(table.double(), 1)  # the weights of all K samples, however the draws were split
    assert torch.allclose(out["ess"], 1 / (w ** 2).sum(1), rtol=1e-9) and torch.allclose(out["max_weight"], w.max(1).values)
    for key, value in out.items():
        assert value.dtype == torch.float64 and value.shape == (n,), key
    expected = torch.logsumexp(table.double(), 1) - math.log(K)
    assert torch.allclose(out["log_px"], expected, rtol=0, atol=1e-9)
    assert torch.allclose(out["L1"], table.double().mean(1), rtol=0, atol=1e-9)
    for kk in (3, 4, 5, 6):  # L5: two groups of 5, the last 2 samples unused
        assert torch.allclose(out[f"L{kk}"], reference(table, kk), rtol=0, atol=1e-9), kk


def tiny_model(seed: int = 0, latents=(4,), hidden=(8,)) -> VAE:
    torch.manual_seed(seed)
    return VAE(list(latents), list(hidden), x_dim=784)


def test_log_likelihoods_bounds_are_ordered_and_reproducible():
    model = tiny_model(latents=(4, 3), hidden=(8, 6))
    x = (torch.rand(15, 784, generator=torch.Generator().manual_seed(2)) < 0.3).float()
    K, eps = 12, 1e-9

    def run(rows):
        return log_likelihoods(model, x, K, [1, 3, 4, 6], rows, seed=7)

    out = run(25)
    # Groups partition the same K samples: mean of logmeanexp over groups <= logmeanexp over
    # their union (Jensen), per example and exactly, so L1 <= L3 <= L6 <= L12 and L1 <= L4 <= L12.
    assert (out["L1"] <= out["L3"] + eps).all() and (out["L3"] <= out["L6"] + eps).all()
    assert (out["L6"] <= out["log_px"] + eps).all()
    assert (out["L1"] <= out["L4"] + eps).all() and (out["L4"] <= out["log_px"] + eps).all()
    assert out["L1"].mean() < out["log_px"].mean()  # a real gap on average for a random model
    assert torch.isfinite(out["log_px"]).all()
    # Fixed seed, same chunking: bit-for-bit the same.
    again = run(25)
    for key in out:
        assert torch.equal(out[key], again[key]), key


def test_an_eval_k_whose_log_weights_do_not_fit_is_refused_before_drawing(monkeypatch):
    """A block holds its examples' K log-weights whole (16 bytes a row at the peak): past the free
    memory the process would be killed with no word, so it is refused, naming eval.k."""
    from vaexp import runtime
    from vaexp.errors import VaexpError

    model = tiny_model()
    x = (torch.rand(9, 784, generator=torch.Generator().manual_seed(2)) < 0.3).float()
    assert runtime.free_memory("cpu") is None or runtime.free_memory("cpu") > 0
    need = 10 * 2 * 16  # K=10, blocks of 20 rows: 2 examples
    monkeypatch.setattr(runtime, "free_memory", lambda device: need - 1)
    with pytest.raises(VaexpError, match=r"eval.k=10: .* lower eval.k"):
        log_likelihoods(model, x, 10, [1], 20, seed=0)
    monkeypatch.setattr(runtime, "free_memory", lambda device: need)
    assert torch.isfinite(log_likelihoods(model, x, 10, [1], 20, seed=0)["log_px"]).all()


def test_log_likelihoods_depend_only_on_seed_and_block_size():
    """Each block of examples re-seeds its generator: a whole block's estimates are the same
    whether more examples follow or not, and eval.chunk=0 uses a constant block size, never one
    derived from free memory."""
    model = tiny_model()
    x = (torch.rand(9, 784, generator=torch.Generator().manual_seed(2)) < 0.3).float()
    full = log_likelihoods(model, x, 10, [1], 20, seed=0)      # blocks of 2 examples
    prefix = log_likelihoods(model, x[:4], 10, [1], 20, seed=0)   # the first two whole blocks
    assert torch.equal(full["log_px"][:4], prefix["log_px"])
    other_seed = log_likelihoods(model, x, 10, [1], 20, seed=1)
    assert not torch.equal(full["log_px"], other_seed["log_px"])
    cfg = eval_conf(k=10, report_k=[1], au_samples=2)
    a = evaluate(model, x, cfg, torch.device("cpu"))["per_example"]["log_px"]
    b = log_likelihoods(model, x, 10, [1], DEFAULT_ROWS, seed=cfg.seed)["log_px"]
    assert torch.equal(a, b)


def eval_conf(**kw):
    cfg = OmegaConf.structured(EvalConf)
    for key, value in kw.items():
        cfg[key] = value
    return cfg


def test_evaluate_metrics():
    model = tiny_model()
    x = (torch.rand(30, 784, generator=torch.Generator().manual_seed(3)) < 0.3).float()
    cfg = eval_conf(k=16, report_k=[64, 1, 4], au_samples=4, n_test=25)
    result = evaluate(model, x, cfg, torch.device("cpu"))
    m = result["metrics"]
    per = result["per_example"]
    assert m["k"] == 16 and m["n_test"] == 25
    assert per["log_px"].shape == (25,) and per["log_px"].dtype == torch.float64
    assert m["nll"] == float(-per["log_px"].mean())
    assert m["L16"] == -m["nll"]
    assert "L64" not in m and "L64" not in per  # only k < K are reported
    assert m["L1"] == float(per["L1"].mean()) and m["L4"] == float(per["L4"].mean())
    assert m["L1"] <= m["L4"] <= m["L16"]
    assert m["nll_stderr"] == pytest.approx(float(per["log_px"].std()) / math.sqrt(25))
    assert m["latent_units"] == [4] and len(m["active_units"]) == 1
    assert len(m["unit_variances"]) == 1 and len(m["unit_variances"][0]) == 4
    assert m["active_units"][0] == sum(v > 0.01 for v in m["unit_variances"][0])
    assert model.training  # evaluate puts the model back into training mode

    again = evaluate(model, x, cfg, torch.device("cpu"))["metrics"]
    assert again == m  # fixed seeds: exactly the same numbers
    other_seed = evaluate(model, x, eval_conf(k=16, report_k=[1], au_samples=4, n_test=25, seed=1),
                          torch.device("cpu"))["metrics"]
    assert other_seed["nll"] != m["nll"]  # the seed does select the samples


def test_active_units_counts_variance_of_posterior_means_above_threshold(monkeypatch):
    model = VAE([3], [5], x_dim=1)
    # Per example (rows) the posterior mean of 3 units; unbiased variance over the 5 examples:
    means = torch.tensor([[0.0, 0.0, 7.0],
                          [0.2, 0.1, 7.0],
                          [0.0, 0.0, 7.0],
                          [0.2, 0.1, 7.0],
                          [0.1, 0.05, 7.0]], dtype=torch.float32)
    var = means.double().var(0, unbiased=True)
    assert var[0] > 0.01 > var[1] and var[2] == 0
    seen = []

    def fake_posterior_means(x, samples, generator):
        seen.append((x.shape[0], samples))
        return [means[x[:, 0].long()]]

    monkeypatch.setattr(model, "posterior_means", fake_posterior_means)
    x = torch.arange(5).float().unsqueeze(1)
    (layer,) = active_units(model, x, threshold=0.01, samples=9, generator=torch.Generator(), batch=2)
    assert seen == [(2, 9), (2, 9), (1, 9)]  # batched, and the batches are put back together
    assert layer["active"] == 1 and layer["units"] == 3
    assert layer["variances"] == pytest.approx(var.tolist(), rel=1e-6)
    (layer,) = active_units(model, x, threshold=0.001, samples=9, generator=torch.Generator(), batch=2)
    assert layer["active"] == 2


def test_active_units_of_a_model_with_dead_units():
    """Zeroed μ weights make a unit's posterior mean constant over x: inactive, in both layers."""
    model = tiny_model(latents=(3, 2), hidden=(8, 6))
    with torch.no_grad():
        q1, q2 = model.encoder
        for unit in (0, 2):
            q1.mu.weight[unit].zero_()
            q1.mu.bias[unit] = 0.5
        q1.mu.weight[1] *= 20.0  # a unit that clearly depends on x
        q1.logsig.weight.zero_()
        q1.logsig.bias.fill_(-8.0)  # z1 ~= its mean, so layer 2 sees unit 1's variation
        q2.mu.weight[0].zero_()  # E[z2_0 | x] = its bias, whatever x
        q2.net[0].weight.mul_(10.0)
        q2.mu.weight[1] = 3.0
    x = (torch.rand(40, 784, generator=torch.Generator().manual_seed(4)) < 0.5).float()
    layers = active_units(model, x, threshold=0.01, samples=4, generator=torch.Generator().manual_seed(0))
    assert [layer["units"] for layer in layers] == [3, 2]
    v1, v2 = layers[0]["variances"], layers[1]["variances"]
    assert v1[0] == 0.0 and v1[2] == 0.0 and v1[1] > 0.01
    assert layers[0]["active"] == 1
    assert v2[0] < 1e-12 and v2[1] > 0.01
    assert layers[1]["active"] == 1


def test_format_table():
    metrics = {"k": 5000, "n_test": 10000, "nll": 85.1234, "nll_stderr": 0.25, "L5000": -85.1234,
               "L64": -85.9, "L1": -89.5, "active_units": [19, 5], "latent_units": [100, 50],
               "unit_variances": [[0.0] * 100, [0.0] * 50]}
    table = format_table(metrics)
    lines = table.splitlines()
    assert "test NLL" in lines[0] and "85.123" in lines[0] and "K=5000" in lines[0] and "10000 images" in lines[0]
    names = [line.split()[0] for line in lines[1:-1]]
    assert names == ["L1", "L64", "L5000"]  # in numeric order
    assert "active units" in lines[-1] and "19/100, 5/50" in lines[-1]


def _binary(n: int, d: int, seed: int) -> torch.Tensor:
    return (torch.rand(n, d, generator=torch.Generator().manual_seed(seed)) < 0.3).float()


@pytest.fixture
def compiled_pass(monkeypatch):
    """The compiled evaluation pass for evaluations of any size, built afresh (skips without a compiler)."""
    if likelihood._kernels(torch.device("cpu")) is None:
        pytest.skip("torch.compile does not work on this machine")
    monkeypatch.setattr(ev, "COMPILE_MIN_ROWS", 0)
    monkeypatch.setattr(ev, "_compiled_pass", {})


def _eager_values(model, x, k, pass_rows):
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(ev._compiled_pass, "fn", False)
        return log_likelihoods(model, x, k, [1, 8], 300, 0, pass_rows=pass_rows)


@pytest.mark.parametrize("k,pass_rows", [(200, 64), (20, 64), (20, 1000)])  # slices, whole examples, one pass
def test_the_compiled_pass_gives_the_eager_passs_values(compiled_pass, k, pass_rows):
    model = VAE([4, 3], [16, 12]).eval()  # D = 784, as the other compiled tests (each D is a graph of its own)
    x = _binary(7, 784, 1)
    calls = []
    real = torch.compile(ev._eager_pass, dynamic=True, fullgraph=True)
    ev._compiled_pass["fn"] = lambda *a: calls.append(1) or real(*a)
    out = log_likelihoods(model, x, k, [1, 8], 300, 0, pass_rows=pass_rows)
    assert calls and ev._compiled_pass["fn"] is not False  # it ran, and its check passed
    ref = _eager_values(model, x, k, pass_rows)
    for key in ref:
        rtol = 1e-3 if key in ("ess", "max_weight") else 1e-6  # exponentials of log-weight differences
        torch.testing.assert_close(out[key], ref[key], rtol=rtol, atol=1e-5)


def test_a_failing_or_wrong_compiled_pass_falls_back_to_the_eager_pass(compiled_pass):
    model = VAE([4], [16]).eval()
    x = _binary(5, 784, 2)
    ref = _eager_values(model, x, 50, 64)

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    def wrong(model, xb, kp, eps):
        return ev._eager_pass(model, xb, kp, eps) + 0.5

    for fn, match in ((broken, "no C\\+\\+ compiler"), (wrong, "differ from the eager pass")):
        ev._compiled_pass["fn"] = fn
        with pytest.warns(RuntimeWarning, match=match):
            out = log_likelihoods(model, x, 50, [1, 8], 300, 0, pass_rows=64)
        assert ev._compiled_pass["fn"] is False  # and the eager pass from then on
        for key in ref:
            assert torch.equal(out[key], ref[key]), key


def test_small_evaluations_plain_mode_and_no_compile_setting_run_the_eager_pass(monkeypatch):
    model = VAE([4], [16], x_dim=48).eval()
    cpu = torch.device("cpu")
    assert ev._Pass(model, cpu, ev.COMPILE_MIN_ROWS - 1).fn is None  # too small to repay a compilation
    monkeypatch.setattr(ev, "_compiled_pass", {"fn": "compiled"})
    assert ev._Pass(model, cpu, ev.COMPILE_MIN_ROWS).fn == "compiled"
    with likelihood.mode("plain"):
        assert ev._Pass(model, cpu, ev.COMPILE_MIN_ROWS).fn is None
    monkeypatch.setenv("VAEXP_COMPILE", "0")
    assert ev._Pass(model, cpu, ev.COMPILE_MIN_ROWS).fn is None


# -- the draws: every pass size sees the same ε, and every sample is its own ---------------------------

def _eval_x(n: int = 7) -> torch.Tensor:
    return (torch.rand(n, 784, generator=torch.Generator().manual_seed(2)) < 0.3).float()


@pytest.mark.parametrize("rows", [25, 6])                # 25: all K in one piece; 6: K = 10 as pieces of 6 + 4
@pytest.mark.parametrize("pass_rows", [3, 7, 12, 1000])  # slices of a piece, whole examples, one pass
def test_log_likelihoods_are_the_same_for_every_pass_size(rows, pass_rows):
    """log_likelihoods' contract: the draws, so the estimates, do not depend on pass_rows (the
    reference draws its ε inside log_weights, one pass per piece). A pass slicing the wrong ε
    (K = 5000 on a CPU takes the slicing branch: 2500 + 2500 rows) would score an image with
    repeated samples, an L_2500 reported as L_5000."""
    model, x, K = tiny_model(latents=(4, 3), hidden=(8, 6)), _eval_x(), 10
    ref = log_likelihoods(model, x, K, [1, 5], rows, seed=3, pass_rows=None)
    out = log_likelihoods(model, x, K, [1, 5], rows, seed=3, pass_rows=pass_rows)
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,pass_rows", [(6, 3), (25, 7), (25, 12), (6, None), (25, None)])
def test_every_sample_of_an_evaluation_is_a_fresh_draw(rows, pass_rows, monkeypatch):
    """N images × K samples are N·K distinct ε: no piece, block or pass reuses another's."""
    model, x, K = tiny_model(latents=(4, 3), hidden=(8, 6)), _eval_x(5), 10
    seen: List[torch.Tensor] = []
    real = VAE.log_weights

    def recording(self, xb, m, k, *args, eps=None, generator=None, **kwargs):
        out = real(self, xb, m, k, *args, eps=eps, generator=generator, **kwargs)
        seen.append(out.zs[0].detach().reshape(-1, out.zs[0].shape[-1]))  # z1 = μ + σ·ε, one per (sample, image)
        return out

    monkeypatch.setattr(VAE, "log_weights", recording)
    log_likelihoods(model, x, K, [], rows, seed=3, pass_rows=pass_rows)
    z = torch.cat(seen)
    assert z.shape[0] == x.shape[0] * K
    assert torch.unique(z, dim=0).shape[0] == z.shape[0]


def test_upper_layer_active_units_average_over_the_lower_layers_noise():
    """Burda et al.'s A_u = Cov_x(E_q[u]): for layer 2, E_q[z2|x] = E_{q(z1|x)}[μ2(z1)], a Monte Carlo
    mean over z1. With q(z1|x) = N(0.5, 1) for every x, E_q[z2|x] does not depend on x: no unit of
    layer 2 is active (one draw of z1 per image would give Var_x ≈ Var(μ2(z1)) ≫ 0.01)."""
    torch.manual_seed(0)
    model = VAE([3, 2], [8, 6], x_dim=784)
    with torch.no_grad():
        q1, q2 = model.encoder
        q1.mu.weight.zero_()
        q1.mu.bias.fill_(0.5)
        q1.logsig.weight.zero_()
        q1.logsig.bias.zero_()
        q2.net[0].weight.mul_(5.0)
        q2.mu.weight.fill_(2.0)
    layers = active_units(model, _eval_x(40), threshold=0.01, samples=2000, generator=torch.Generator().manual_seed(0))
    assert layers[1]["active"] == 0 and max(layers[1]["variances"]) < 0.01, layers[1]["variances"]


def test_upper_layer_posterior_means_are_monte_carlo_means_over_z1():
    """E_q[z2|x] = E_{z1~q(z1|x)}[μ2(z1)], not μ2(E[z1|x]): with q(z1|x) = N(0, σ(x)²), μ2 at the mean is
    the same for every x while the true E_q[z2|x] varies with σ(x) (μ2 is nonlinear). Reference: an
    independent Monte Carlo mean of 20,000 draws."""
    torch.manual_seed(0)
    model = VAE([3, 2], [8, 6], x_dim=784)
    x = _eval_x(40)
    with torch.no_grad():
        q1, q2 = model.encoder
        q1.mu.weight.zero_()
        q1.mu.bias.zero_()
        q1.logsig.weight.zero_()
        q1.logsig.weight[:, :20] = 0.6
        q1.logsig.bias.fill_(-2.0)
        q2.net[0].weight.mul_(4.0)
        q2.mu.weight.mul_(10.0)
        for lin in (q2.net[0], q2.net[2]):
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=torch.Generator().manual_seed(5)) * 1.5)
        _, logsig = q1(x)
        z1 = torch.exp(logsig) * torch.randn((20000,) + logsig.shape, generator=torch.Generator().manual_seed(9))
        ref = q2(z1)[0].mean(0).double().var(0)
    layers = active_units(model, x, threshold=0.01, samples=20000, generator=torch.Generator().manual_seed(0))
    assert ref.max() > 0.05  # the test has something to see
    torch.testing.assert_close(torch.tensor(layers[1]["variances"], dtype=torch.float64), ref, rtol=0.1, atol=2e-3)
