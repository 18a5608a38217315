"""Tests for ldmlr.py: properties of the diffusion math, the small training loops, and the whole
pipeline through its real command line on digits with --smoke."""
import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch
from hypothesis import given, settings, strategies as st

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import ldmlr  # noqa: E402
import lt_data  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "ldmlr.py")
ROWS = ("CE", "LA", "CE+LDMLR", "LA+LDMLR", "cRT")
CPU = torch.device("cpu")


# -------------------------------------------------------------------------------------------------
# Diffusion math


@given(T=st.integers(2, 3000))
@settings(max_examples=40, deadline=None)
def test_cosine_schedule_is_valid(T):
    beta, abar = ldmlr.cosine_schedule(T)
    assert beta.dtype == abar.dtype == torch.float64 and len(beta) == len(abar) == T
    assert bool((beta > 0).all()) and bool((beta < 1).all())
    assert bool((abar[1:] < abar[:-1]).all())
    assert torch.allclose(abar, torch.cumprod(1 - beta, 0))


@given(T=st.integers(100, 3000))
@settings(max_examples=20, deadline=None)
def test_cosine_schedule_runs_from_data_to_noise(T):
    _, abar = ldmlr.cosine_schedule(T)
    assert abar[0] > 0.99 and abar[-1] < 1e-3


@given(t=st.integers(0, 999), x0=st.lists(st.floats(-3, 3), min_size=1, max_size=4),
       seed=st.integers(0, 2 ** 31))
@settings(max_examples=25, deadline=None)
def test_q_sample_has_closed_form_mean_and_variance(t, x0, seed):
    _, abar = ldmlr.cosine_schedule(1000)
    n = 20000
    x0 = torch.tensor(x0, dtype=torch.float64).expand(n, -1)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    xt = ldmlr.q_sample(x0, torch.full((n,), t), eps, abar)
    a = abar[t].item()
    # 6 standard errors of the sample mean / variance: fails by chance with probability ~1e-9.
    mean_tol = 6 * ((1 - a) / n) ** 0.5 + 1e-9
    var_tol = 6 * (1 - a) * (2 / n) ** 0.5 + 1e-9
    assert torch.allclose(xt.mean(0), a ** 0.5 * x0[0], atol=mean_tol, rtol=0)
    assert torch.allclose(xt.var(0), torch.full_like(x0[0], 1 - a), atol=var_tol, rtol=0)


@given(t=st.integers(0, 999), seed=st.integers(0, 2 ** 31), dim=st.integers(1, 16))
@settings(max_examples=40, deadline=None)
def test_x0_eps_x0_round_trip_through_ddim_step(t, seed, dim):
    _, abar = ldmlr.cosine_schedule(1000)
    g = torch.Generator().manual_seed(seed)
    x0 = 3 * torch.randn(5, dim, generator=g, dtype=torch.float64)
    eps = torch.randn(5, dim, generator=g, dtype=torch.float64)
    xt = ldmlr.q_sample(x0, torch.full((5,), t), eps, abar)
    a_t, a_prev = abar[t].item(), abar[t - 1].item() if t else 1.0
    # eps -> x0: a step to the data (a_prev = 1) returns the x0 that eps implies
    assert torch.allclose(ldmlr.ddim_step(xt, eps, a_t, 1.0), x0, atol=1e-6)
    # x0 -> eps: a clip box that holds only the true x0 re-derives the true eps from any estimate
    clipped = ldmlr.ddim_step(xt, eps + 1, a_t, a_prev, clip=(x0, x0))
    assert torch.allclose(clipped, ldmlr.ddim_step(xt, eps, a_t, a_prev), atol=1e-6)


def small_denoiser(dim=3, classes=2, seed=0):
    torch.manual_seed(seed)
    return ldmlr.Denoiser(dim, classes, width=32, blocks=2).eval()


@given(seed=st.integers(0, 2 ** 31), steps=st.integers(1, 20))
@settings(max_examples=10, deadline=None)
def test_ddim_with_eta_zero_is_deterministic(seed, steps):
    model = small_denoiser()
    _, abar = ldmlr.cosine_schedule(1000)
    y = torch.tensor([0, 1, 1])
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(seed))

    def sample(eta, rng_seed):
        torch.manual_seed(rng_seed)
        return ldmlr.ddim_sample(model, y, 3, abar, steps, eta, x=x)
    # Same start, different global RNG state: eta = 0 must draw no noise at all ...
    assert torch.equal(sample(0.0, 1), sample(0.0, 2))
    # ... whereas eta = 1 does use the RNG (one step goes straight to x0, without noise).
    assert steps == 1 or not torch.equal(sample(1.0, 1), sample(1.0, 2))


@given(seed=st.integers(0, 2 ** 31), eta=st.floats(0, 1))
@settings(max_examples=10, deadline=None)
def test_ddim_one_step_returns_the_x0_prediction(seed, eta):
    model = small_denoiser()
    _, abar = ldmlr.cosine_schedule(1000)
    y = torch.tensor([1, 0])
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(seed))
    out = ldmlr.ddim_sample(model, y, 3, abar, 1, eta, x=x)
    a = abar[999].item()
    with torch.no_grad():
        expected = (x - (1 - a) ** 0.5 * model(x, torch.full((2,), 999), y)) / a ** 0.5
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_ddim_box_clamps_the_x0_prediction():
    model = small_denoiser()
    _, abar = ldmlr.cosine_schedule(1000)
    box = (torch.full((3,), -0.5), torch.full((3,), 0.25))
    torch.manual_seed(0)
    out = ldmlr.ddim_sample(model, torch.tensor([0, 1]), 3, abar, 1, 0.0, clip=box)
    assert bool((out >= -0.5).all()) and bool((out <= 0.25).all())


def test_clip_x0_is_a_bool_flag_on_by_default():
    assert ldmlr.parse_config(["--dataset", "cifar10"]).clip_x0 is True
    assert ldmlr.parse_config(["--dataset", "cifar10", "--no-clip-x0"]).clip_x0 is False
    with pytest.raises(lt_data.BadInput):
        ldmlr.parse_config(["--clip-x0", "box"])


# -------------------------------------------------------------------------------------------------
# Generation counts, logit adjustment, samplers, mixup


@given(counts=st.lists(st.integers(1, 5000), min_size=1, max_size=30), ratio=st.floats(0, 2),
       group=st.sampled_from(["all", "many", "medium", "few"]))
@settings(max_examples=60, deadline=None)
def test_generation_count_rule(counts, ratio, group):
    out = ldmlr.generation_counts(counts, ratio, group)
    groups = lt_data.shot_groups(counts)
    for c, (n, g) in enumerate(zip(counts, out)):
        if group == "all" or c in groups[group]:
            assert g == max(round(ratio * n), 5) and g >= 5
        else:
            assert g == 0
    filled = ldmlr.generation_counts(counts, ratio, group, fill=True, n_max=max(counts))
    for c, (n, g) in enumerate(zip(counts, filled)):
        in_group = group == "all" or c in groups[group]
        assert g == (max(counts) - n if in_group else 0)


def test_generation_counts_on_digits_profile():
    # by hand: 0.2 * [110, 78, 56, 40, 29] = [22, 15.6, 11.2, 8, 5.8], the rest are lifted to 5
    counts = [110, 78, 56, 40, 29, 20, 14, 10, 7, 5]
    assert ldmlr.generation_counts(counts, 0.2) == [22, 16, 11, 8, 6, 5, 5, 5, 5, 5]
    assert ldmlr.generation_counts(counts, 0.2, "few") == [0] * 6 + [5] * 4


@given(logits=st.lists(st.lists(st.floats(-20, 20), min_size=4, max_size=4), min_size=1,
                       max_size=8), n=st.integers(1, 1000))
@settings(max_examples=40, deadline=None)
def test_logit_adjustment_with_uniform_prior_is_identity(logits, n):
    logits = torch.tensor(logits, dtype=torch.float64)
    adjusted = lt_data.logit_adjust(logits, [n] * 4, tau=1.0)
    shift = adjusted - logits  # tau * log(C): the same constant for every class
    assert torch.allclose(shift, shift[:, :1].expand_as(shift))
    assert torch.allclose(torch.softmax(adjusted, 1), torch.softmax(logits, 1))


def test_la_ldmlr_adjusts_with_the_real_training_counts(tmp_path):
    """Class 1 has 1 real image and 99 pseudo-features. A prior of real + pseudo counts would be
    uniform and change nothing; the real counts (the official label-shift row) move the test
    sample, whose logits (1, 0) favour class 0, to its class 1."""
    cfg = ldmlr.parse_config(["--dataset", "digits", "--out", str(tmp_path)])  # fills Few
    data = types.SimpleNamespace(num_classes=2, train_counts=[100, 1], n_max=100)
    eye = {"weight": torch.eye(2), "bias": torch.zeros(2)}
    g = torch.Generator().manual_seed(0)
    train_f, train_y = torch.randn(101, 2, generator=g), torch.tensor([0] * 100 + [1])
    test_f, test_y = torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    ldmlr.save(str(tmp_path / "encode" / "features.pt"), fc=eye,
               train={"features": train_f, "labels": train_y, "logits": train_f},
               test={"features": test_f, "labels": test_y, "logits": test_f})
    ldmlr.save(str(tmp_path / "generate" / "pseudo.pt"), features=torch.randn(99, 2, generator=g),
               labels=torch.ones(99, dtype=torch.long), counts=[0, 99])
    ldmlr.save(str(tmp_path / "finetune" / "heads.pt"), ldmlr=eye, crt=eye)
    rows = ldmlr.stage_evaluate(cfg, data, CPU)["rows"]
    assert rows["CE"]["overall"] == rows["CE+LDMLR"]["overall"] == 0.0
    assert rows["LA"]["overall"] == rows["LA+LDMLR"]["overall"] == 100.0


def test_crt_sampler_draws_classes_uniformly_in_expectation():
    counts = [60, 20, 5, 1]
    labels = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    n = 40000
    idx = ldmlr.balanced_indices(labels, n, torch.Generator().manual_seed(1))
    freq = torch.bincount(labels[idx], minlength=4).double() / n
    se = (0.25 * 0.75 / n) ** 0.5
    assert torch.allclose(freq, torch.full((4,), 0.25, dtype=torch.float64), atol=5 * se)
    # within a class every instance is equally likely too (class 0: 60 instances)
    hits = torch.bincount(idx[labels[idx] == 0], minlength=len(labels))[labels == 0].double()
    expected = n / 4 / 60
    assert hits.min() > 0.6 * expected and hits.max() < 1.4 * expected


def test_mixup_encoder_is_reproducible_and_mixes(tmp_path):
    """The mixup draws come from the per-epoch seeded RNG: the same seed gives the same encoder,
    and mixup changes what it learns."""
    data = lt_data.load_dataset("digits", imb=20, seed=0)

    def encoder(name, mixup):
        cfg = ldmlr.parse_config(["--dataset", "digits", "--smoke", "--epochs", "1", "--out",
                                  str(tmp_path / name), "--mixup", str(mixup)])
        ldmlr.stage_encoder(cfg, data, CPU)
        return ldmlr.load_checkpoint(str(tmp_path / name / "encoder" / "ckpt.pt"))["model"]
    a, b, plain = encoder("a", 0.5), encoder("b", 0.5), encoder("plain", 0.0)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], plain[k]) for k in a)


# -------------------------------------------------------------------------------------------------
# The denoiser learns, and the diffusion stage resumes exactly


def test_denoiser_learns_a_two_class_toy():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[2.0, -1.0], [-2.0, 1.0]])
    y = torch.randint(0, 2, (2000,), generator=g)
    x = means[y] + 0.3 * torch.randn(2000, 2, generator=g)
    _, abar = ldmlr.cosine_schedule(1000)
    model = ldmlr.Denoiser(2, 2, width=64, blocks=2)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)

    def eval_loss():  # the same t and noise every time, without touching the training stream
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(123)
            return ldmlr.ddpm_loss(model, x, y, abar).item()

    start = eval_loss()
    for _ in range(400):
        idx = torch.randint(0, 2000, (256,), generator=g)
        loss = ldmlr.ddpm_loss(model, x[idx], y[idx], abar)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = eval_loss()
    assert end < 0.5 * start, (start, end)
    box = (x.min(0).values, x.max(0).values)
    for c in (0, 1):
        torch.manual_seed(c)
        s = ldmlr.ddim_sample(model.eval(), torch.full((200,), c), 2, abar, 50, 0.0, clip=box)
        own = (s - means[c]).norm(dim=1)
        other = (s - means[1 - c]).norm(dim=1)
        assert (own < other).float().mean() > 0.9
        assert (s.mean(0) - means[c]).norm() < (s.mean(0) - means[1 - c]).norm()


def test_diffusion_stage_resumes_to_the_same_weights(tmp_path):
    """A run stopped at a checkpoint and resumed equals an uninterrupted run."""
    g = torch.Generator().manual_seed(0)
    feats = torch.relu(torch.randn(60, 8, generator=g))
    labels = torch.arange(60) % 3
    data = types.SimpleNamespace(num_classes=3)

    def cfg_for(out, steps):
        return ldmlr.parse_config(["--dataset", "digits", "--smoke", "--out", str(out),
                                   "--diffusion-steps", str(steps), "--ckpt-every", "10"])

    for name in ("straight", "resumed"):
        ldmlr.save(str(tmp_path / name / "encode" / "features.pt"),
                   train={"features": feats, "labels": labels})
    torch.manual_seed(5)
    ldmlr.stage_diffusion(cfg_for(tmp_path / "straight", 30), data, CPU)
    torch.manual_seed(5)
    ldmlr.stage_diffusion(cfg_for(tmp_path / "resumed", 20), data, CPU)
    torch.manual_seed(99)  # the resumed process starts with other global RNG state
    ldmlr.stage_diffusion(cfg_for(tmp_path / "resumed", 30), data, CPU)
    a = ldmlr.load_checkpoint(str(tmp_path / "straight" / "diffusion" / "ckpt.pt"))
    b = ldmlr.load_checkpoint(str(tmp_path / "resumed" / "diffusion" / "ckpt.pt"))
    assert a["step"] == b["step"] == 30
    for key in ("model", "ema"):
        for name, v in a[key].items():
            assert torch.equal(v, b[key][name]), (key, name)


# -------------------------------------------------------------------------------------------------
# End to end through the command line (digits, --smoke)


def run_cli(*args):
    return subprocess.run([sys.executable, SCRIPT, "--dataset", "digits", *args],
                          capture_output=True, text=True, timeout=300)


def skipped(stage, proc):
    return f"[ldmlr] {stage}: done, skipped" in proc.stderr


def stage_files(out):
    """{path: mtime_ns} of every file inside the stage folders."""
    found = {}
    for stage in ldmlr.STAGES:
        for root, _, files in os.walk(os.path.join(out, stage)):
            for f in files:
                found[os.path.join(root, f)] = os.stat(os.path.join(root, f)).st_mtime_ns
    return found


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ldmlr") / "run")
    proc = run_cli("--smoke", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(os.path.join(out, "results.json")) as f:
        return out, json.load(f), proc


@pytest.mark.slow
def test_smoke_results_have_every_row_and_key(smoke_run):
    out, res, proc = smoke_run
    assert {"method", "dataset", "imb", "seed", "train_counts", "rows", "generated", "timing_s",
            "config"} <= set(res)
    assert res["method"] == "ldmlr" and res["dataset"] == "digits" and res["seed"] == 0
    assert res["train_counts"] == [110, 78, 56, 40, 29, 20, 14, 10, 7, 5]
    assert set(res["rows"]) == set(ROWS)
    for name, row in res["rows"].items():
        assert set(row) == {"overall", "many", "medium", "few", "per_class"}, name
        assert len(row["per_class"]) == 10 and 0 <= row["overall"] <= 100
        assert name in proc.stdout  # the printed table
    gen = res["generated"]
    # digits default: the Few classes (< 20 images) filled up to n_max = 110
    assert gen["counts"] == [0, 0, 0, 0, 0, 0, 96, 100, 103, 105] and gen["total"] == 404
    assert gen["frechet"] is not None and gen["frechet"] >= 0  # > 64 samples of each
    assert gen["frechet_per_class"] == [None] * 10  # no class has > 64 of both
    assert set(res["timing_s"]) == set(ldmlr.STAGES)
    assert res["config"]["smoke"] is True and res["config"]["out"] == out
    # LA+LDMLR is the LDMLR head's logits adjusted with the real training counts
    enc = ldmlr.load_checkpoint(os.path.join(out, "encode", "features.pt"))
    head = ldmlr.ce_head(enc)
    ldmlr.load_checkpoint(os.path.join(out, "finetune", "heads.pt"), into={"ldmlr": head})
    with torch.no_grad():
        adjusted = lt_data.logit_adjust(head(enc["test"]["features"]), res["train_counts"])
    expected = lt_data.accuracy_report(adjusted.argmax(1), enc["test"]["labels"],
                                       res["train_counts"])
    assert res["rows"]["LA+LDMLR"] == expected


@pytest.mark.slow
def test_smoke_rerun_skips_every_stage_and_redo_recomputes(smoke_run):
    out, res, _ = smoke_run
    before = stage_files(out)
    proc = run_cli("--smoke", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for stage in ldmlr.STAGES:
        assert skipped(stage, proc)
    assert stage_files(out) == before  # nothing rewritten
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["rows"] == res["rows"]

    proc = run_cli("--smoke", "--out", out, "--redo", "diffusion")
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = stage_files(out)
    for stage in ("encoder", "encode"):
        assert skipped(stage, proc)
    for stage in ("diffusion", "generate", "finetune", "evaluate"):
        assert not skipped(stage, proc)
    for path, mtime in before.items():
        recomputed = any(os.sep + s + os.sep in path for s in ldmlr.STAGES[2:])
        assert (after[path] != mtime) == recomputed, path
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["rows"] == res["rows"]  # recomputed from the same seed: same rows


@pytest.mark.slow
def test_redo_generate_may_change_the_generation_fields_only(smoke_run, tmp_path):
    src, res, _ = smoke_run
    out = str(tmp_path / "copy")
    shutil.copytree(src, out)
    proc = run_cli("--smoke", "--out", out, "--ratio", "0.5")  # without --redo: refused
    assert proc.returncode == 2 and "ratio" in proc.stderr
    proc = run_cli("--smoke", "--out", out, "--redo", "diffusion", "--epochs", "3")
    assert proc.returncode == 2 and "epochs" in proc.stderr  # the encoder reads it
    ratio_rule = ["--ratio", "0.5", "--no-fill", "--generate-for", "all"]
    proc = run_cli("--smoke", "--out", out, "--redo", "generate", *ratio_rule)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for stage in ("encoder", "encode", "diffusion"):
        assert skipped(stage, proc)
    with open(os.path.join(out, "results.json")) as f:
        new = json.load(f)
    assert new["generated"]["counts"] == [55, 39, 28, 20, 14, 10, 7, 5, 5, 5]
    assert new["rows"]["CE"] == res["rows"]["CE"]
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["ratio"] == 0.5  # the directory now describes the new setting
    proc = run_cli("--smoke", "--out", out, *ratio_rule)  # and reruns as it
    assert proc.returncode == 0 and skipped("evaluate", proc)


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--imb", "0.5"], ["--dataset", "mnist"], ["--seed", "1"],
                                  ["--eta", "2"], ["--redo", "nonsense"]])
def test_bad_input_exits_2_with_one_line(smoke_run, args):
    out, _, _ = smoke_run
    proc = run_cli("--smoke", "--out", out, *args)  # --seed 1: the run dir holds seed 0
    assert proc.returncode == 2, (args, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "error" in lines[0]


def test_stage_one_is_the_same_model_as_diffults_baseline(tmp_path):
    """Both scripts train the same CE model from the same seed: one shared baseline row."""
    import diffult
    args = ["--dataset", "digits", "--smoke", "--seed", "3"]
    cfg_l = ldmlr.parse_config(args + ["--out", str(tmp_path / "l")])
    cfg_d = diffult.parse_config(args + ["--out", str(tmp_path / "d")])
    data = lt_data.load_dataset("digits", imb=cfg_l.imb, seed=3)
    torch.manual_seed(11)  # whatever the global RNG holds before, each stage seeds its own init
    ldmlr.stage_encoder(cfg_l, data, CPU)
    torch.manual_seed(12)
    diffult.stage_baseline(cfg_d, data, CPU)
    a = ldmlr.load_checkpoint(str(tmp_path / "l" / "encoder" / "ckpt.pt"))["model"]
    b = diffult.load_checkpoint(str(tmp_path / "d" / "baseline" / "ckpt.pt"))["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_help_names_every_flag_and_the_redo_fields_exist():
    proc = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fields = {f.name for f in ldmlr.dataclasses.fields(ldmlr.Config)}
    for name in fields:
        assert "--" + name.replace("_", "-") in proc.stdout, name
    for stage, names in ldmlr.REDO_FIELDS.items():
        assert stage in ldmlr.STAGES and set(names) <= fields, stage
