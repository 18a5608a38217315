"""Speed measurements of the two scripts' networks on the machine at hand: measurements, not tests.

    python -m pytest -m bench -s tests/test_bench.py      # a few minutes on 2 idle CPU cores

Every figure is the median of several timed repetitions after warm-up ones (the printed line says
how many), in fp32 and in bf16 autocast (torch.autocast on the device, dtype bfloat16). The
variants of one measurement take turns repetition by repetition, so that load from other programs
on a shared machine falls on all of them alike. Nothing here asserts a speed: a test fails only if
a measurement did not run (a figure that is not a finite positive number), or, for the comparison
with diffusers' UNet2DModel, if diffusers is not installed (it is not a project dependency).
The big UNets are timed on small batches (printed), so that the file runs in minutes; per image
they run faster on bigger batches (CIFAR UNet on 2 cores, batch 32 against 8: fp32 +13 %, bf16
+34 %), so their figures are lower bounds for the scripts' batches.
"""
import contextlib
import dataclasses
import io
import math
import os
import statistics
import sys
import time
import types

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import diffult  # noqa: E402
import ldmlr  # noqa: E402
import lt_data  # noqa: E402

pytestmark = pytest.mark.bench
CPU = torch.device("cpu")
PRECISIONS = ("fp32", "bf16")
# (dataset, classes, channels) of each UNet configuration in diffult.DEFAULTS (cifar10 and
# cifar100 share theirs; cifar100 has the larger label table).
UNETS = (("digits", 10, 1), ("cifar100", 100, 3), ("imagenet_lt", 1000, 3))
# Per configuration: (training batch, sampling batch, warm-up repetitions, timed repetitions).
# digits trains at batch 64 and samples at 256, the batches of README's figures.
UNET_RUNS = {"digits": (64, 256, 3, 10), "cifar100": (8, 8, 1, 3), "imagenet_lt": (4, 4, 1, 3)}


def autocast(precision):
    return torch.autocast(CPU.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def interleaved(fns, warmup, reps):
    """{name: median seconds of fns[name]()}: `warmup` untimed calls of each, then `reps` rounds
    in which every fn is timed once, in turn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def rates(fns, items, warmup, reps):
    """{name: items per second} from the median time of each fn (items per call)."""
    med = interleaved(fns, warmup, reps)
    out = {name: items / s for name, s in med.items()}
    for name, r in out.items():
        assert math.isfinite(r) and r > 0, f"{name}: measured {r}"
    return out


def machine():
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"load average {load:.1f} on {os.cpu_count()} cores")


def both(r, unit):
    return "  ".join(f"{p} {r[p]:8.1f} {unit}" for p in PRECISIONS)


def params_m(model):
    return sum(p.numel() for p in model.parameters()) / 1e6


# -------------------------------------------------------------------------------------------------
# diffult.py's UNet: one training step of the epsilon-prediction loss, one guided sampling step.


def unet(dataset, classes, channels):
    cfg = diffult.parse_config(["--dataset", dataset])
    torch.manual_seed(0)
    data = types.SimpleNamespace(num_classes=classes, channels=channels)
    return diffult.make_unet(cfg, data), cfg


def diffusion_step(model, opt_, x0, y, abar, gen, precision, forward=None):
    """DDPM Algorithm 1 with Adam (the core of diffult.py's diffusion stage, without the CBDM
    regulariser and L_AID): t and eps drawn, x_t by q_sample, ||eps - eps_theta(x_t, t, y)||^2.
    `forward(model, x_t, t, y)` calls another model's interface (diffusers)."""
    t = torch.randint(len(abar), (len(y),), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    x_t = diffult.q_sample(x0, t, noise, abar)
    with autocast(precision):
        eps = model(x_t, t, y) if forward is None else forward(model, x_t, t, y)
    loss = (eps.float() - noise).square().mean()
    opt_.zero_grad(set_to_none=True)
    loss.backward()
    opt_.step()
    assert math.isfinite(loss.item())


def test_unet_training_and_sampling():
    print(f"\n[bench] diffult.py UNet ({machine()})")
    _, abar = diffult.linear_schedule(1000, 1e-4, 0.02)
    for dataset, classes, channels in UNETS:
        model, cfg = unet(dataset, classes, channels)
        size = cfg.gen_size
        train_b, sample_b, warmup, reps = UNET_RUNS[dataset]
        gen = torch.Generator().manual_seed(0)
        x0 = torch.rand(train_b, channels, size, size, generator=gen) * 2 - 1
        y = torch.randint(classes + 1, (train_b,), generator=gen)
        opt_ = torch.optim.Adam(model.parameters(), lr=cfg.diffusion_lr)
        model.train()
        train = rates({p: (lambda p=p: diffusion_step(model, opt_, x0, y, abar, gen, p))
                       for p in PRECISIONS}, train_b, warmup, reps)
        shape = f"{size}x{size}x{channels}"
        print(f"  train   {dataset:<12} {shape:>8} {params_m(model):6.2f} M  batch {train_b:4d}   "
              f"{both(train, 'img/s')}   (median of {reps} after {warmup} warm-up)")

        # One denoising step as stage_generate takes it: the EMA UNet's guided prediction, the
        # conditional and the null-label halves in one batch of 2 x sample_b (guided_eps).
        model.eval()
        x = torch.randn(sample_b, channels, size, size, generator=gen)
        labels = torch.randint(classes, (sample_b,), generator=gen)

        def denoise(p):
            with torch.no_grad(), autocast(p):
                eps = diffult.guided_eps(model, x, 500, labels, cfg.guidance, classes)
            assert bool(torch.isfinite(eps).all())

        samp = rates({p: (lambda p=p: denoise(p)) for p in PRECISIONS}, sample_b, warmup, reps)
        print(f"  sample  {dataset:<12} {shape:>8} {params_m(model):6.2f} M  batch {sample_b:4d}   "
              f"{both(samp, 'img/s')}   per denoising step, guided (2 x {sample_b} forward), "
              f"median of {reps} after {warmup} warm-up")


# -------------------------------------------------------------------------------------------------
# ResNet-32 with the scripts' own training loop (normalise + augment + forward + backward + SGD).


def test_resnet32_training(tmp_path):
    print(f"\n[bench] ResNet-32, diffult.train_classifier, one epoch per repetition ({machine()})")
    steps = 6
    for name, channels, size, mean, std in (("cifar10", 3, 32) + lt_data.CIFAR["cifar10"][2:],
                                            ("digits", 1, 8, lt_data.DIGITS["mean"],
                                             lt_data.DIGITS["std"])):
        base = diffult.parse_config(["--dataset", name, "--epochs", "1",
                                     "--out", str(tmp_path / name)])
        n = base.batch_size * steps
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=gen)
        labels = torch.arange(n) % 10
        train = lt_data.TensorImages(images, labels)
        data = lt_data.LTData(name=name, train=train, train_plain=train, val=None, test=train,
                              train_counts=torch.bincount(labels).tolist(), num_classes=10,
                              channels=channels, image_size=size, mean=mean, std=std,
                              n_max=int(torch.bincount(labels).max()))
        torch.manual_seed(0)
        model = diffult.make_classifier("resnet32", 10, channels)
        runs = iter(range(10 ** 6))

        def epoch(precision):
            cfg = dataclasses.replace(base, precision=precision)
            ckpt = str(tmp_path / f"{name}_{next(runs)}.pt")  # fresh: nothing to resume
            with contextlib.redirect_stderr(io.StringIO()):  # the progress bar
                diffult.train_classifier(model, train, data, cfg, CPU, ckpt, "bench")
            os.remove(ckpt)

        r = rates({p: (lambda p=p: epoch(p)) for p in PRECISIONS}, n, 1, 5)
        print(f"  train   {name:<12} {size}x{size}x{channels:<4} {params_m(model):6.2f} M  "
              f"batch {base.batch_size:4d}   {both(r, 'img/s')}   ({steps} steps per epoch incl. "
              f"its checkpoint; median of 5 after 1 warm-up)")


# -------------------------------------------------------------------------------------------------
# ldmlr.py's feature denoiser: training vectors/s, and the denoiser pass of one DDIM step.


def test_feature_denoiser():
    print(f"\n[bench] ldmlr.py Denoiser on 64-d ResNet-32 features ({machine()})")
    _, abar = ldmlr.cosine_schedule(1000)
    for name, classes in (("cifar100", 100), ("digits", 10)):
        cfg = ldmlr.parse_config(["--dataset", name])
        dim = 64
        torch.manual_seed(0)
        model = ldmlr.Denoiser(dim, classes, cfg.denoiser_width, cfg.denoiser_blocks)
        opt_ = torch.optim.Adam(model.parameters(), lr=cfg.diffusion_lr)
        gen = torch.Generator().manual_seed(0)
        x0 = torch.randn(cfg.diffusion_batch, dim, generator=gen)
        y = torch.randint(classes, (cfg.diffusion_batch,), generator=gen)

        def step(p):
            with autocast(p):
                loss = ldmlr.ddpm_loss(model, x0, y, abar)
            opt_.zero_grad(set_to_none=True)
            loss.float().backward()
            opt_.step()
            assert math.isfinite(loss.item())

        train = rates({p: (lambda p=p: step(p)) for p in PRECISIONS}, cfg.diffusion_batch, 5, 20)
        gen_b = 1024  # stage_generate's batch
        z = torch.randn(gen_b, dim, generator=gen)
        zy = torch.randint(classes, (gen_b,), generator=gen)
        tt = torch.full((gen_b,), 500)

        def denoise(p):
            with torch.no_grad(), autocast(p):
                assert bool(torch.isfinite(model(z, tt, zy)).all())

        samp = rates({p: (lambda p=p: denoise(p)) for p in PRECISIONS}, gen_b, 5, 20)
        print(f"  {name:<9} width {cfg.denoiser_width:4d}, {cfg.denoiser_blocks} blocks, "
              f"{params_m(model):5.2f} M   train (batch {cfg.diffusion_batch}) {both(train, 'vec/s')}"
              f"   sample step (batch {gen_b}) {both(samp, 'vec/s')}   (median of 20 after 5 "
              f"warm-up)")


# -------------------------------------------------------------------------------------------------
# Our UNet against diffusers' UNet2DModel in the pytorch-ddpm / CBDM CIFAR configuration.


def diffusers_unet(classes):
    """UNet2DModel configured as our CIFAR UNet: 32x32x3, channels (128, 256, 256, 256), 2 residual
    blocks per level, single-head self-attention at 16x16 (the second level, down and up) and in
    the middle block, dropout 0.1, GroupNorm 32, a learned embedding of classes + 1 labels (the
    null label of classifier-free guidance) added to the time embedding."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        UNet2DModel = None
    if UNet2DModel is None:  # outside the except block: one line, no chained traceback
        pytest.fail("diffusers is not installed: pip install diffusers (needed only for this "
                    "comparison)", pytrace=False)
    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=256, norm_num_groups=32, dropout=0.1, num_class_embeds=classes + 1,
        add_attention=True)


def test_unet_against_diffusers():
    classes, batch, warmup, reps = 100, 8, 1, 5
    torch.manual_seed(0)
    theirs = diffusers_unet(classes)
    ours, cfg = unet("cifar100", classes, 3)
    print(f"\n[bench] our CIFAR UNet against diffusers' UNet2DModel, training step, batch {batch} "
          f"({machine()})")
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
    print(f"  parameters: ours {n_ours:,}, diffusers {n_theirs:,}"
          f"{' (equal)' if n_ours == n_theirs else '  -- NOT EQUAL: the configurations differ'}")
    _, abar = diffult.linear_schedule(1000, 1e-4, 0.02)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch, 3, 32, 32, generator=gen) * 2 - 1
    y = torch.randint(classes + 1, (batch,), generator=gen)
    steps = {}
    for who, model, fwd in (("ours", ours, None),
                            ("diffusers", theirs,
                             lambda m, x, t, y: m(x, t, class_labels=y).sample)):
        model.train()
        opt_ = torch.optim.Adam(model.parameters(), lr=cfg.diffusion_lr)
        for p in PRECISIONS:
            steps[who, p] = (lambda m=model, o=opt_, p=p, f=fwd:
                             diffusion_step(m, o, x0, y, abar, gen, p, forward=f))
    r = rates(steps, batch, warmup, reps)
    for p in PRECISIONS:
        print(f"  {p}: ours {r['ours', p]:6.2f} img/s, diffusers {r['diffusers', p]:6.2f} img/s, "
              f"ours / diffusers = {r['ours', p] / r['diffusers', p]:.2f}   (median of {reps} "
              f"after {warmup} warm-up, interleaved)")
