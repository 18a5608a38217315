"""Tests for diffult.py: properties of the diffusion math and losses (hypothesis), the UNet, and
the whole pipeline through its command line (--smoke on digits, marked slow)."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import diffult  # noqa: E402
import lt_data  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(HERE), "diffult.py")
BETAS, ABAR = diffult.linear_schedule(1000, 1e-4, 0.02)
steps = st.integers(0, 999)


# ---- schedule and the forward process -----------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(T=st.integers(2, 3000), b1=st.floats(1e-5, 1e-2), ratio=st.floats(1.01, 50.0))
def test_linear_schedule_bounds_and_monotonic(T, b1, ratio):
    bT = min(b1 * ratio, 0.5)
    betas, abar = diffult.linear_schedule(T, b1, bT)
    assert betas.dtype == abar.dtype == torch.float64 and len(betas) == T
    assert ((betas > 0) & (betas < 1)).all()
    assert (betas[1:] >= betas[:-1]).all()
    assert (abar[1:] < abar[:-1]).all() and (abar > 0).all() and (abar < 1).all()
    assert betas[0].item() == pytest.approx(b1) and betas[-1].item() == pytest.approx(bT)


@settings(max_examples=20, deadline=None)
@given(t=steps, value=st.floats(-1, 1))
def test_q_sample_has_the_closed_form_mean_and_variance(t, value):
    n = 40_000
    gen = torch.Generator().manual_seed(t)
    x0 = torch.full((n, 1, 1, 1), value, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    x_t = diffult.q_sample(x0, torch.full((n,), t), noise, ABAR)
    mean, var = ABAR[t].sqrt() * value, 1 - ABAR[t]
    # 5 standard errors of the empirical mean / variance of n Gaussian draws
    assert abs(x_t.mean().item() - mean.item()) < 5 * (var / n).sqrt().item()
    assert abs(x_t.var().item() - var.item()) < 5 * var.item() * (2 / n) ** 0.5


@settings(max_examples=30, deadline=None)
@given(t=steps, seed=st.integers(0, 10_000))
def test_x0_eps_x0_round_trip(t, seed):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(4, 1, 8, 8, generator=gen, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    tt = torch.full((4,), t)
    x_t = diffult.q_sample(x0, tt, eps, ABAR)
    assert torch.allclose(diffult.predict_x0(x_t, tt, eps, ABAR), x0, atol=1e-6)


def pytorch_ddpm_step(x_t, t, eps, noise):
    """One step of pytorch-ddpm's GaussianDiffusionSampler (mean_type 'epsilon', var_type
    'fixedlarge'), as CBDM samples, written out from its buffers: x_0 from eps, not clipped; the
    posterior mean at it; log-variance log(cat([posterior_var[1:2], betas[1:]]))."""
    alphas = 1 - BETAS
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), ABAR[:-1]])
    x_0 = (1 / ABAR[t]).sqrt() * x_t - (1 / ABAR[t] - 1).sqrt() * eps
    coef1 = BETAS * abar_prev.sqrt() / (1 - ABAR)
    coef2 = (1 - abar_prev) * alphas.sqrt() / (1 - ABAR)
    posterior_var = BETAS * (1 - abar_prev) / (1 - ABAR)
    log_var = torch.log(torch.cat([posterior_var[1:2], BETAS[1:]]))
    mean = coef1[t] * x_0 + coef2[t] * x_t
    return mean + (0.5 * log_var[t]).exp() * noise if t > 0 else mean


@settings(max_examples=40, deadline=None)
@given(t=st.integers(0, 999), seed=st.integers(0, 10_000))
def test_ddpm_step_is_pytorch_ddpms(t, seed):
    gen = torch.Generator().manual_seed(seed)
    x_t = 3 * torch.randn(2, 1, 4, 4, generator=gen, dtype=torch.float64)  # x0_hat beyond [-1, 1]
    eps = torch.randn(x_t.shape, generator=gen, dtype=torch.float64)
    noise = torch.randn(x_t.shape, generator=gen, dtype=torch.float64)
    expected = pytorch_ddpm_step(x_t, t, eps, noise)
    assert torch.allclose(diffult.ddpm_step(x_t, t, eps, BETAS, ABAR, noise), expected,
                          rtol=1e-9, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(t=st.integers(1, 999), frac=st.floats(0, 1))
def test_ddim_eta0_is_deterministic_and_ignores_noise(t, frac):
    a_prev = ABAR[int(frac * (t - 1))].item() if frac < 1 else 1.0
    x_t = torch.randn(3, 1, 4, 4)
    eps = torch.randn_like(x_t)
    a = diffult.ddim_step(x_t, eps, ABAR[t].item(), a_prev, 0.0, torch.randn_like(x_t))
    b = diffult.ddim_step(x_t, eps, ABAR[t].item(), a_prev, 0.0, torch.randn_like(x_t))
    assert torch.equal(a, b)
    if a_prev < 1:  # eta > 0 does use the noise (except on the last step, where sigma = 0)
        c = diffult.ddim_step(x_t, eps, ABAR[t].item(), a_prev, 1.0, torch.randn_like(x_t))
        assert not torch.equal(a, c)


def test_sampling_with_a_seeded_rng_repeats_exactly():
    torch.manual_seed(0)
    model = diffult.UNet(2, 1, 8, 16, (1, 2), 1, (4,), 0.1).eval()
    labels = torch.tensor([0, 1, 1])
    for sampler in ("ddim", "ddpm"):
        cfg = diffult.parse_config(["--smoke", "--sampler", sampler, "--timesteps", "20"])
        betas, abar = diffult.linear_schedule(20)

        def run(seed):
            torch.manual_seed(seed)
            return diffult.sample(model, labels, cfg, (1, 8, 8), betas, abar, 2)
        a, b, c = run(3), run(3), run(4)
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert a.shape == (3, 1, 8, 8) and a.abs().max() <= 1


def test_guidance_combines_the_two_predictions_in_fp32_under_bf16():
    class BF16Model(torch.nn.Module):  # predictions that arrive in bf16, as under autocast
        def forward(self, x, t, y):
            return (x * (1 + y.view(-1, 1, 1, 1)) / 3).to(torch.bfloat16)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 0, 1])
    out = diffult.guided_eps(BF16Model(), x, 10, y, 1.6, 2)
    eps_c, eps_u = BF16Model()(x, None, y).float(), BF16Model()(x, None, torch.full_like(y, 2)).float()
    assert out.dtype == torch.float32
    assert torch.equal(out, 2.6 * eps_c - 1.6 * eps_u)


# ---- losses ----------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), tau=st.floats(0, 3), gamma=st.floats(0, 1))
def test_cbdm_loss_zero_when_label_is_ignored_and_never_negative(seed, tau, gamma):
    gen = torch.Generator().manual_seed(seed)
    eps_y = torch.randn(5, 1, 4, 4, generator=gen)
    t = torch.randint(1000, (5,), generator=gen)
    assert torch.equal(diffult.cbdm_loss(eps_y, eps_y.clone(), t, 1000, tau, gamma),
                       torch.zeros(5))
    other = torch.randn(5, 1, 4, 4, generator=gen)
    assert (diffult.cbdm_loss(eps_y, other, t, 1000, tau, gamma) >= 0).all()


def test_cbdm_difference_is_taken_in_fp32_under_bf16():
    gen = torch.Generator().manual_seed(0)
    eps_y = torch.randn(4, 3, 8, 8, generator=gen)
    eps_yp = eps_y + 1e-3 * torch.randn(eps_y.shape, generator=gen)  # nearly equal, as at high t
    t = torch.full((4,), 999)
    a, b = eps_y.to(torch.bfloat16), eps_yp.to(torch.bfloat16)
    expected = diffult.cbdm_loss(a.float(), b.float(), t, 1000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = diffult.cbdm_loss(a, b, t, 1000)
    assert got.dtype == torch.float32 and torch.equal(got, expected)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), tau=st.floats(0.1, 3), gamma=st.floats(0.05, 1))
def test_cbdm_stop_gradients_route_as_the_formula_says(seed, tau, gamma):
    gen = torch.Generator().manual_seed(seed)
    eps_y = torch.randn(3, 1, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    eps_yp = torch.randn(3, 1, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 499, 999])
    diffult.cbdm_loss(eps_y, eps_yp, t, 1000, tau, gamma).sum().backward()
    w = (tau * (t + 1) / 1000).view(3, 1, 1, 1).double()
    diff = (eps_y - eps_yp).detach()
    # d/d eps(y) comes only from the first term, d/d eps(y') only from the gamma term
    assert torch.allclose(eps_y.grad, w * 2 * diff / 4)
    assert torch.allclose(eps_yp.grad, -w * gamma * 2 * diff / 4)


@settings(max_examples=40, deadline=None)
@given(r=st.floats(0, 6), radius=st.floats(0.1, 10), abar_t=st.floats(0.01, 1))
def test_aid_loss_is_zero_inside_the_band_and_grows_outside(r, radius, abar_t):
    centre = torch.tensor([[1.0, -2.0, 0.5]])
    direction = torch.tensor([[0.6, 0.0, 0.8]])  # unit length

    def loss(r_):
        return diffult.aid_loss(centre + r_ * radius * direction, centre,
                                torch.tensor([radius]), torch.tensor([abar_t])).item()
    if 1 <= r <= 2:
        assert loss(r) == pytest.approx(0, abs=1e-5)
    elif r < 1:
        assert loss(r) == pytest.approx(abar_t * (1 - r), abs=1e-4)
        assert loss(r * 0.5) >= loss(r) - 1e-6
    else:
        assert loss(r) == pytest.approx(abar_t * (r - 2), abs=1e-4, rel=1e-4)
        assert loss(r + 1) > loss(r)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), omega=st.floats(0.05, 2))
def test_weighted_ce(seed, omega):
    """train_classifier's loss: mean_i w_i CE_i, w = weights[idx]; plain CE when omega = 1."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 4, generator=gen)
    labels = torch.randint(4, (6,), generator=gen)
    idx = torch.tensor([5, 0, 3, 7, 2, 6])  # positions of the batch in the whole dataset
    real_then_synthetic = torch.tensor([1.0] * 4 + [omega] * 4)

    def loss(weights):
        return diffult.weighted_ce(logits, labels, None if weights is None else weights[idx])
    assert torch.allclose(loss(torch.ones(8)), F.cross_entropy(logits, labels))
    assert torch.allclose(loss(None), F.cross_entropy(logits, labels))
    w = real_then_synthetic[idx]
    manual = sum(w[i] * F.cross_entropy(logits[i:i + 1], labels[i:i + 1]) for i in range(6)) / 6
    assert torch.allclose(loss(real_then_synthetic), manual)


def test_id_aid_ood_rule_on_hand_built_distances():
    d = torch.tensor([0.0, 1.0, 1.01, 2.0, 2.01, 9.0, 3.0, 3.1])
    radius = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.5, 1.5])
    assert diffult.band(d, radius).tolist() == [0, 0, 1, 1, 2, 2, 1, 2]


def test_diffult_la_prior_counts_synthetic_samples_at_omega():
    prior = diffult.training_prior([100, 10, 2], [0, 90, 98], 0.3)
    assert prior == pytest.approx([100, 37, 31.4])
    # and the adjustment it gives: logits - log(prior / sum)
    adjusted = lt_data.logit_adjust(torch.zeros(1, 3), prior, 1.0)
    expected = -torch.log(torch.tensor([100, 37, 31.4]) / 168.4)
    assert torch.allclose(adjusted, expected.view(1, 3))


def test_generation_plan_tops_every_class_up_to_the_target():
    plan = diffult.generation_plan([110, 40, 5], 110, 50)
    labels = torch.cat(plan)
    assert torch.bincount(labels, minlength=3).tolist() == [0, 70, 105]
    assert [len(p) for p in plan] == [50, 50, 50, 25]


# ---- the UNet ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset", ["digits", "cifar10", "imagenet_lt"])
def test_unet_output_shape_equals_input_shape(dataset):
    cfg = diffult.parse_config(["--dataset", dataset])
    C = {"digits": 1}.get(dataset, 3)
    model = diffult.make_unet(cfg, types.SimpleNamespace(num_classes=10, channels=C)).eval()
    if dataset == "cifar10":  # the pytorch-ddpm / CBDM CIFAR UNet: ~35.7 M parameters
        n = sum(p.numel() for p in model.parameters())
        assert 35.6e6 < n < 35.9e6
    x = torch.randn(1, C, cfg.gen_size, cfg.gen_size)
    with torch.no_grad():
        out = model(x, torch.tensor([500]), torch.tensor([3]))
    assert out.shape == x.shape


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), size=st.sampled_from([(1, 8, 4, 4), (3, 16, 2, 5)]),
       channels_last=st.booleans())
def test_attention_equals_the_written_out_formula(seed, size, channels_last):
    # softmax(q k^T / sqrt(C)) v over the H*W positions, q, k, v and the output projection as 1x1
    # convolutions on the normalised input, plus the residual: fails if q, k and v are mixed up.
    torch.manual_seed(seed)
    B, C, H, W = size
    attn = diffult.Attention(C).double()  # float64: outputs reach ~100, float32 rounding 1e-4
    for p in attn.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    qkv = F.conv2d(attn.norm(x), attn.qkv.weight, attn.qkv.bias).flatten(2)  # (B, 3C, HW)
    q, k, v = qkv[:, :C], qkv[:, C:2 * C], qkv[:, 2 * C:]
    w = torch.softmax(q.transpose(1, 2) @ k / C ** 0.5, dim=-1)  # (B, HW query, HW key)
    h = (v @ w.transpose(1, 2)).view(B, C, H, W)
    expected = x + F.conv2d(h, attn.proj.weight, attn.proj.bias)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.allclose(attn(x), expected, atol=1e-9, rtol=1e-9)


def test_unet_learns_a_two_class_toy_set():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    checker = (torch.arange(8).view(8, 1) + torch.arange(8).view(1, 8)) % 2 * 2.0 - 1
    images = torch.stack([torch.full((1, 8, 8), -1.0), checker[None]])  # class 0, class 1
    model = diffult.UNet(2, 1, 8, 16, (1, 2), 1, (4,), 0.0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)

    def batch(g, n=16):
        y = torch.randint(2, (n,), generator=g)
        t = torch.randint(1000, (n,), generator=g)
        noise = torch.randn(n, 1, 8, 8, generator=g)
        return diffult.q_sample(images[y], t, noise, ABAR), t, y, noise

    fixed = batch(torch.Generator().manual_seed(1), 256)

    def fixed_loss():
        with torch.no_grad():
            x_t, t, y, noise = fixed
            return F.mse_loss(model(x_t, t, y), noise).item()
    start = fixed_loss()
    for _ in range(250):
        x_t, t, y, noise = batch(gen)
        loss = F.mse_loss(model(x_t, t, y), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fixed_loss() < 0.4 * start


# ---- end to end through the command line -----------------------------------------------------------

def run_cli(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          cwd=os.path.dirname(SCRIPT))


@pytest.mark.slow
def test_smoke_end_to_end_rerun_and_resume(tmp_path):
    out = str(tmp_path / "run")
    first = run_cli("--dataset", "digits", "--smoke", "--out", out)
    assert first.returncode == 0, first.stderr
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    assert set(res) == {"method", "dataset", "imb", "seed", "train_counts", "rows", "generated",
                        "timing_s", "config"}
    assert res["method"] == "diffult" and res["train_counts"] == [110, 78, 56, 40, 29, 20, 14,
                                                                  10, 7, 5]
    assert set(res["rows"]) == {"CE", "LA", "DiffuLT", "DiffuLT+LA"}
    for row in res["rows"].values():
        assert set(row) == {"overall", "many", "medium", "few", "per_class"}
        assert len(row["per_class"]) == 10 and 0 <= row["overall"] <= 100
    gen = res["generated"]
    assert gen["counts"] == [max(0, 30 - n) for n in res["train_counts"]]
    fr = gen["fractions"]
    assert fr["id"] + fr["aid"] + fr["ood"] == pytest.approx(1)
    assert gen["kept"] == round(sum(gen["counts"]) * (fr["id"] + fr["aid"]))
    assert set(gen["frechet"]) == {"overall", "per_class", "id", "aid", "ood"}
    assert set(gen["mean_distance"]) == {"id", "aid", "ood"}
    assert set(res["timing_s"]) == set(diffult.STAGES)
    assert os.path.getsize(os.path.join(out, "samples.png")) > 0
    assert "train_counts" in res and res["config"]["dataset"] == "digits"

    # a second run skips every stage and reproduces the results file
    second = run_cli("--dataset", "digits", "--smoke", "--out", out)
    assert second.returncode == 0, second.stderr
    assert all(f"{s}: done, skipped" in second.stderr for s in diffult.STAGES)
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["rows"] == res["rows"]

    # the diffusion record holds the three loss terms of its last log interval
    with open(os.path.join(out, "diffusion", "done.json")) as f:
        record = json.load(f)
    assert record["loss_simple"] > 0 and record["loss_cbdm"] >= 0 and record["loss_aid"] >= 0


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--imb", "0.5"], ["--sampler", "euler"], ["--unet-ch", "15"],
                                  ["--timesteps", "100000"],
                                  ["--unet-mult", "1,x"], ["--eval-split", "val", "--dataset",
                                                           "cifar10", "--data-root", "/nonexist",
                                                           "--no-download"]])
def test_bad_input_exits_2_with_one_line(tmp_path, args):
    r = run_cli("--dataset", "digits", "--smoke", "--out", str(tmp_path / "bad"), *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in r.stderr


@pytest.mark.slow
def test_run_directory_with_another_config_is_refused(tmp_path):
    out = str(tmp_path / "run")
    os.makedirs(out)
    diffult.save_json({"dataset": "digits", "cbdm_tau": 0.5}, os.path.join(out, "config.json"))
    r = run_cli("--dataset", "digits", "--smoke", "--out", out)
    assert r.returncode == 2 and "another config" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_a_generator_of_another_size_than_the_images_runs_end_to_end(tmp_path):
    """--gen-size 16 on the 8x8 digits: L_AID, the filter and the classifier see the samples
    resized to the classifier's input."""
    out = str(tmp_path / "run")
    r = run_cli("--dataset", "digits", "--smoke", "--gen-size", "16", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    shard = torch.load(os.path.join(out, "generate", "shard_00000.pt"))
    assert shard["images"].shape[1:] == (1, 16, 16)
    with open(os.path.join(out, "classifier", "done.json")) as f:
        assert json.load(f)["synthetic"] > 0


@pytest.mark.parametrize("arch, dim", [("resnet10", 512), ("resnet50", 2048)])
def test_imagenet_backbones_take_any_channel_count(arch, dim):
    for channels in (1, 3):
        model = diffult.make_classifier(arch, 10, channels).eval()
        x = torch.randn(2, channels, 32, 32)
        with torch.no_grad():
            assert model(x).shape == (2, 10) and model.features(x).shape == (2, dim)
