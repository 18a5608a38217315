"""LDMLR: latent (feature-space) diffusion for long-tailed recognition, one self-contained script.

P. Han et al., "Latent-based Diffusion Model for Long-tailed Recognition", CVPR 2024 workshops
(arXiv 2404.04517). A classifier trained with CE on the long-tailed set encodes every image into
its penultimate feature; a class-conditional DDPM (Ho et al. 2020) learns those features; DDIM
(Song et al. 2021) samples extra "pseudo-features", mostly for the tail; only the final linear
layer is retrained on real + pseudo features. Stages, each cached in the run directory:

    encoder    ResNet-32 (CIFAR, digits) / ResNet-10 (ImageNet-LT) trained with CE   -> row CE
    encode     penultimate features + CE logits of train / val / test
    diffusion  class-conditional DDPM on standardised features (cosine schedule, residual MLP)
    generate   DDIM pseudo-features, max(round(ratio * n_c), 5) per class
    finetune   the final linear layer on real + pseudo features; cRT on real features only
    evaluate   rows CE, LA, CE+LDMLR, LA+LDMLR, cRT and the Frechet distance of the pseudo-features

Run:
    python ldmlr.py --dataset digits --imb 20           # offline, 2 CPU cores, < 2 minutes
    python ldmlr.py --dataset cifar100 --imb 100        # the paper's recipe, on a GPU
    torchrun --nproc_per_node 4 ldmlr.py --dataset cifar100 --imb 100    # on 4 GPUs (DDP)

Measured on digits, r = 20, test top-1 %, mean of seeds 0, 1, 2 (overall / Few), with
OMP_NUM_THREADS=1 DATASETS=digits RATIOS=20 SEEDS="0 1 2" bash run_all.sh (README):
    CE 93.17 / 84.79   LA 94.33 / 87.71   cRT 94.17 / 87.29
    CE+LDMLR 94.83 / 89.17   LA+LDMLR 94.67 / 88.54
One run takes 32 s on two idle CPU cores (median of 3, /usr/bin/time).
"""
import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import lt_data
from lt_data import BadInput

# -------------------------------------------------------------------------------------------------
# Config: one dataclass, one help line per field. None = take the per-dataset default below.

# The pipeline, in order; each stage caches its outputs in <out>/<stage>/.
STAGES = ["encoder", "encode", "diffusion", "generate", "finetune", "evaluate"]


def opt(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    # ---- common to both scripts (INTERFACE.md)
    dataset: str = opt("digits", "benchmark; sets the per-dataset defaults",
                       ("cifar10", "cifar100", "imagenet_lt", "digits"))
    imb: float = opt(None, "imbalance ratio r >= 1 (head/tail); ignored for imagenet_lt")
    seed: int = opt(0, "one seed for data subsampling, init and training")
    data_root: str = opt("./data", "where datasets live")
    download: bool = opt(False, "download CIFAR if it is missing (off: a missing dataset is an error)")
    out: str = opt(None, "run directory (default runs/<method>_<dataset>_imb<R>_seed<S>)")
    device: str = opt("auto", "device", ("auto", "cpu", "cuda", "mps"))
    smoke: bool = opt(False, "tiny budgets for every stage, so the pipeline runs in seconds")
    redo: str = opt(None, "recompute this stage and every stage after it", tuple(STAGES))
    eval_split: str = opt("test", "evaluate on the test set, or on the validation split carved "
                          "from the training data (digits, ImageNet-LT) when tuning", ("test", "val"))
    workers: int = opt(4, "DataLoader workers for datasets read from disk (ImageNet-LT)")
    precision: str = opt("auto", "forward passes of training and sampling in bf16 autocast or "
                         "fp32; auto = bf16 on CUDA devices that support it, else fp32",
                         ("auto", "fp32", "bf16"))
    channels_last: str = opt("auto", "channels_last memory format for the encoder (a conv net); "
                             "auto = on CUDA only", ("auto", "on", "off"))
    compile: bool = opt(False, "torch.compile the training models (compiling takes minutes; "
                        "pays off on long GPU runs)")
    # ---- stage 1 classifier, the recipe of Cao et al. 2019 (LDAM-DRW) for ResNet-32 on CIFAR-LT
    arch: str = opt(None, "classifier backbone", ("resnet32", "resnet10", "resnet50"))
    epochs: int = opt(None, "classifier epochs (paper: 200 on CIFAR)")
    batch_size: int = opt(None, "classifier batch size (paper: 128)")
    lr: float = opt(None, "SGD learning rate (paper: 0.1), x0.1 at 80% and 90% of the epochs")
    warmup_epochs: int = opt(None, "linear warm-up epochs (paper: 5)")
    weight_decay: float = opt(None, "SGD weight decay (paper: 2e-4)")
    image_size: int = opt(None, "image side fed to the networks (imagenet_lt only; CIFAR 32, digits 8)")
    # ---- LDMLR (METHOD.md section 3)
    mixup: float = opt(0.0, "mixup alpha for the encoder (official code: 0.5; 0 = off, the "
                            "shared CE baseline)")
    timesteps: int = opt(1000, "diffusion steps T (paper: 1000)")
    diff_steps: int = opt(None, "diffusion training steps (official code: 201 epochs over the "
                                "features; ours in steps)")
    diff_batch: int = opt(None, "diffusion minibatch size (ours)")
    diff_lr: float = opt(None, "diffusion Adam learning rate (ours; the official code: SGD 1e-4)")
    diff_width: int = opt(None, "width of the residual-MLP denoiser (ours)")
    diff_blocks: int = opt(None, "residual blocks of the denoiser (ours)")
    diff_ema: float = opt(None, "EMA decay of the denoiser weights used for sampling (ours)")
    diff_sampling: str = opt("instance", "diffusion minibatches: uniform over instances (the "
                             "official code) or class-balanced", ("instance", "balanced"))
    ckpt_every: int = opt(None, "diffusion checkpoint interval in steps")
    sample_steps: int = opt(None, "DDIM sampling steps (the paper says DDIM; the official code "
                                  "runs 1000-step ancestral sampling)")
    eta: float = opt(0.0, "DDIM eta: 0 = deterministic DDIM, 1 = DDPM-like (Song et al. eq. 16)")
    clip_x0: str = opt("box", "clamp DDIM's x0 prediction to the per-dimension range of the real "
                       "standardised features (ours), or not at all", ("box", "none"))
    ratio: float = opt(0.2, "pseudo-features per class: max(round(ratio * n_c), 5) (official 0.2)")
    generate_for: str = opt("all", "generate for all classes or one shot group only (the paper "
                            "finds tail-focused generation helps most)",
                            ("all", "many", "medium", "few"))
    fill: bool = opt(False, "top every chosen class up to n_max instead of the ratio rule "
                     "(digits default, with --generate-for few; --no-fill for the ratio rule)")
    ft_epochs: int = opt(None, "final-layer retraining epochs (official code: 400)")
    ft_lr: float = opt(1e-3, "final-layer Adam learning rate (paper: 1e-3)")
    ft_weight_decay: float = opt(1e-5, "final-layer Adam weight decay (paper: 1e-5)")
    ft_batch: int = opt(1024, "final-layer batch size (paper: 1024)")
    tau: float = opt(1.0, "post-hoc logit adjustment strength (official 'label shift': 1)")


# Per-dataset defaults: the papers' settings for CIFAR / ImageNet-LT, CPU-sized budgets for digits.
DEFAULTS = {
    "cifar10": dict(imb=100, arch="resnet32", epochs=200, batch_size=128, lr=0.1, warmup_epochs=5,
                    weight_decay=2e-4, image_size=32),
    "cifar100": dict(imb=100, arch="resnet32", epochs=200, batch_size=128, lr=0.1, warmup_epochs=5,
                     weight_decay=2e-4, image_size=32),
    # ResNet-10, 90 epochs, batch 256, lr 0.1, wd 5e-4: the usual ImageNet-LT recipe (ours: the
    # papers do not restate it).
    "imagenet_lt": dict(imb=256, arch="resnet10", epochs=90, batch_size=256, lr=0.1,
                        warmup_epochs=5, weight_decay=5e-4, image_size=224),
    # digits (8x8 grey, a few hundred images): ResNet-32 still fits; budgets sized for 2 CPU cores.
    "digits": dict(imb=20, arch="resnet32", epochs=60, batch_size=64, lr=0.05, warmup_epochs=5,
                   weight_decay=5e-4, image_size=8),
}
# LDMLR's own per-dataset defaults. Paper / official code: T = 1000, ratio 0.2, the final-layer
# recipe (Adam 1e-3, wd 1e-5, batch 1024, 400 epochs). Ours: the denoiser (a residual MLP; the
# official code uses a kernel-1 1-D UNet), Adam for it, steps, width, EMA and DDIM steps.
METHOD_DEFAULTS = {
    "cifar10": dict(diff_steps=20000, diff_batch=256, diff_lr=1e-3, diff_width=512, diff_blocks=4,
                    diff_ema=0.9995, ckpt_every=2000, sample_steps=100, ft_epochs=400),
    "cifar100": dict(diff_steps=20000, diff_batch=256, diff_lr=1e-3, diff_width=512,
                     diff_blocks=4, diff_ema=0.9995, ckpt_every=2000, sample_steps=100,
                     ft_epochs=400),
    "imagenet_lt": dict(diff_steps=100000, diff_batch=512, diff_lr=1e-3, diff_width=1024,
                        diff_blocks=4, diff_ema=0.9995, ckpt_every=5000, sample_steps=100,
                        ft_epochs=400),
    # digits: budgets for 2 CPU cores. The generation setting was chosen on the validation split
    # (seeds 0-2, README "How the digits defaults were chosen"): filling the Few classes up to
    # n_max beat the ratio rule, filling all classes, and ratio 1 on all or Few classes.
    "digits": dict(diff_steps=3000, diff_batch=256, diff_lr=1e-3, diff_width=128, diff_blocks=3,
                   diff_ema=0.999, ckpt_every=500, sample_steps=50, ft_epochs=400, fill=True,
                   generate_for="few"),
}
for _name, _values in METHOD_DEFAULTS.items():
    DEFAULTS[_name].update(_values)
SMOKE = dict(epochs=2, diff_steps=40, diff_width=64, diff_blocks=1, ckpt_every=20, sample_steps=5,
             ft_epochs=5)
# Fields that do not change results: a run directory may be reused with other values of them.
# channels_last and compile are here because they change which kernels compute the same operations
# (another memory layout, summation order or convolution algorithm), not the operations: the
# numbers then differ as they do between two devices, and --device is here too. precision is not:
# bf16 keeps 8 significant bits, and that is another computation.
NOT_RESULTS = ("out", "device", "data_root", "download", "redo", "workers", "channels_last",
               "compile")
# Fields that no stage before the named one reads: `--redo STAGE` may change them in an existing run
# directory (--redo diffusion --diff-width 256 reuses the encoder and its features; --redo generate
# --ratio 0.5 reuses the trained denoiser too).
REDO_FIELDS = {"diffusion": ("timesteps", "diff_steps", "diff_batch", "diff_lr", "diff_width",
                             "diff_blocks", "diff_ema", "diff_sampling", "ckpt_every"),
               "generate": ("sample_steps", "eta", "clip_x0", "ratio", "generate_for", "fill"),
               "finetune": ("ft_epochs", "ft_lr", "ft_weight_decay", "ft_batch"),
               "evaluate": ("tau", "eval_split")}


class ArgParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, not argparse's usage block
        raise BadInput(message)


def parse_config(argv=None, method="ldmlr"):
    parser = ArgParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(Config):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        if f.type is bool or f.type == "bool":  # --fill / --no-fill: a default may be either
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=meta["help"].replace("%", "%%"))
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            parser.add_argument(flag, type=typ, default=None, choices=meta["choices"],
                                help=meta["help"].replace("%", "%%"))
    args = vars(parser.parse_args(argv))
    dataset = args["dataset"] or Config.dataset
    values = {f.name: f.default for f in dataclasses.fields(Config)}
    values.update(DEFAULTS[dataset])
    if args["smoke"]:
        values.update(SMOKE)
    values.update({k: v for k, v in args.items() if v is not None})
    cfg = Config(**values)
    # nan fails every comparison below unnoticed and inf passes most: floats must be finite first
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise BadInput(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
    if not 0 <= cfg.seed < 2 ** 32:
        raise BadInput(f"--seed must be in 0 .. 2^32 - 1 (numpy's seed range), got {cfg.seed}")
    if cfg.imb < 1:
        raise BadInput(f"--imb must be >= 1 (head/tail ratio), got {cfg.imb}")
    for name in ("epochs", "batch_size", "image_size"):
        if getattr(cfg, name) < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("timesteps", "diff_steps", "diff_batch", "diff_width", "diff_blocks",
                 "ckpt_every", "sample_steps", "ft_epochs", "ft_batch"):
        if getattr(cfg, name) < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.diff_width % 2:
        raise BadInput(f"--diff-width must be even (sin / cos time embedding), got {cfg.diff_width}")
    if cfg.timesteps < 2 or cfg.sample_steps > cfg.timesteps:
        raise BadInput(f"need 2 <= --timesteps and --sample-steps <= --timesteps, got "
                       f"{cfg.timesteps} and {cfg.sample_steps}")
    if not 0 <= cfg.eta <= 1:
        raise BadInput(f"--eta must be in [0, 1], got {cfg.eta}")
    if not 0 <= cfg.diff_ema < 1:
        raise BadInput(f"--diff-ema must be in [0, 1), got {cfg.diff_ema}")
    for name in ("mixup", "ratio", "ft_weight_decay", "weight_decay", "warmup_epochs", "workers"):
        if getattr(cfg, name) < 0:
            raise BadInput(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    for name, most in (("lr", lt_data.SGD_LR_MAX), ("diff_lr", lt_data.ADAM_LR_MAX),
                       ("ft_lr", lt_data.ADAM_LR_MAX)):
        if not 0 < getattr(cfg, name) <= most:
            raise BadInput(f"--{name.replace('_', '-')} must be > 0 and <= {most:.2g}, "
                           f"got {getattr(cfg, name)}")
    if cfg.out is None:
        cfg.out = os.path.join("runs", f"{method}_{cfg.dataset}_imb{cfg.imb:g}_seed{cfg.seed}")
    return cfg


# -------------------------------------------------------------------------------------------------
# Classifier: ResNet-32 for CIFAR / digits (He et al. 2016, option-A shortcuts), ResNet-10 / 50
# for ImageNet-LT. forward(x) -> logits; features(x) -> the pooled penultimate feature.


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.pad = (c_out - c_in) // 2 if stride != 1 or c_in != c_out else None

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        # Option A: subsample and zero-pad channels, no parameters in the shortcut.
        short = x if self.pad is None else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + short)


class ResNet32(nn.Module):
    """3 stages of 5 BasicBlocks, 16/32/64 channels, 64-d feature, ~0.46 M parameters."""

    def __init__(self, num_classes, in_channels=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU())
        blocks, c_in = [], 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            for b in range(5):
                blocks.append(BasicBlock(c_in, c_out, stride if b == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def features(self, x):  # (B, C, H, W) -> (B, 64)
        return self.blocks(self.stem(x)).mean((2, 3))

    def forward(self, x):
        return self.fc(self.features(x))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 with 4x expansion (ResNet-50); projection shortcut on a change."""

    def __init__(self, c_in, width, stride):
        super().__init__()
        c_out = 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.short = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                    nn.BatchNorm2d(c_out))
                      if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x):
        return F.relu(self.body(x) + self.short(x))


class ImageNetBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-10 / 18); projection shortcut on a change of shape."""

    def __init__(self, c_in, width, stride):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width))
        self.short = (nn.Sequential(nn.Conv2d(c_in, width, 1, stride, bias=False),
                                    nn.BatchNorm2d(width))
                      if stride != 1 or c_in != width else nn.Identity())

    def forward(self, x):
        return F.relu(self.body(x) + self.short(x))


class ResNet(nn.Module):
    """ImageNet ResNet (He et al. 2016): 7x7 stem and max-pool, four stages of 64 / 128 / 256 / 512
    widths. ResNet-10 = basic blocks [1, 1, 1, 1] (512-d feature, the ImageNet-LT backbone of
    Liu et al. 2019); ResNet-50 = bottlenecks [3, 4, 6, 3] (2048-d feature). Random init."""

    def __init__(self, arch, num_classes, in_channels=3):
        super().__init__()
        block, depths, expansion = {"resnet10": (ImageNetBlock, (1, 1, 1, 1), 1),
                                    "resnet50": (Bottleneck, (3, 4, 6, 3), 4)}[arch]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False),
                                  nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        blocks, c_in = [], 64
        for i, (width, depth) in enumerate(zip((64, 128, 256, 512), depths)):
            for b in range(depth):
                blocks.append(block(c_in, width, 2 if b == 0 and i > 0 else 1))
                c_in = width * expansion
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x):  # (B, C, H, W) -> (B, 512 or 2048)
        return self.blocks(self.stem(x)).mean((2, 3))

    def forward(self, x):
        return self.fc(self.features(x))


def make_classifier(arch, num_classes, in_channels):
    if arch == "resnet32":
        return ResNet32(num_classes, in_channels)
    return ResNet(arch, num_classes, in_channels)


# -------------------------------------------------------------------------------------------------
# Denoiser for feature vectors: a residual MLP with a sinusoidal time embedding and a learned class
# embedding (ours; the official code uses a 1-D UNet whose convolutions all have kernel size 1,
# i.e. also a per-vector MLP, with more machinery).


def timestep_embedding(t, dim):
    """Sinusoidal embedding of the integer step t (Vaswani et al. 2017, as used by Ho et al. 2020):
    [cos(t w_k), sin(t w_k)] with w_k = 10000^(-k / (dim / 2)). t: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """h + W2 SiLU(W1 LN(h) + E emb): a pre-norm residual block, conditioned through its input."""

    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.emb = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)
        nn.init.zeros_(self.fc2.weight)  # each block starts as the identity
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h, emb):  # h, emb: (B, width)
        return h + self.fc2(F.silu(self.fc1(self.norm(h)) + self.emb(emb)))


class Denoiser(nn.Module):
    """eps_theta(x_t, t, y): predicts the noise in a standardised feature vector x_t (B, D)."""

    def __init__(self, dim, num_classes, width, blocks):
        super().__init__()
        self.width = width
        self.inp = nn.Linear(dim, width)
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.label = nn.Embedding(num_classes, width)
        self.blocks = nn.ModuleList(ResBlock(width) for _ in range(blocks))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x, t, y):  # x: (B, D), t: (B,) integer steps 0..T-1, y: (B,) labels
        emb = F.silu(self.time(timestep_embedding(t, self.width)) + self.label(y))  # (B, width)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)  # (B, D)


# -------------------------------------------------------------------------------------------------
# Diffusion math. Index i = 0..T-1 of every schedule array stands for the paper's step t = i + 1;
# abar = 1 "at i = -1" is the clean data.


def cosine_schedule(T, s=0.008, max_beta=0.999):
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17): abar(t) = f(t) / f(0) with
    f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2), beta_t = 1 - abar(t) / abar(t - 1) clipped to
    max_beta = 0.999 (their fix for the singularity at t = T). Returns (beta, abar), float64 (T,),
    abar recomputed as cumprod(1 - beta) so the two always agree; checked here."""
    t = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos(((t / T) + s) / (1 + s) * torch.pi / 2) ** 2
    beta = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    abar = torch.cumprod(1 - beta, dim=0)
    if not (bool((beta > 0).all()) and bool((beta < 1).all())
            and bool((abar[1:] < abar[:-1]).all())):
        raise ValueError(f"bad cosine schedule for T={T}: need 0 < beta < 1, abar decreasing")
    return beta, abar


def q_sample(x0, t, eps, abar):
    """Forward process in closed form (Ho et al. 2020, eq. 4):
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, eps ~ N(0, I). t: (B,) indices into abar."""
    a = abar.to(x0.device)[t].to(x0.dtype)[:, None]  # (B, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def predict_x0(x_t, t, eps, abar):
    """Invert eq. 4 for x0 given the noise: x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    a = abar.to(x_t.device)[t].to(x_t.dtype)[:, None]
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def predict_eps(x_t, t, x0, abar):
    """Invert eq. 4 for the noise given x0: eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""
    a = abar.to(x_t.device)[t].to(x_t.dtype)[:, None]
    return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


def ddim_step(x_t, eps, abar_t, abar_prev, eta, noise, x0_range=None):
    """One generalised step (Song et al. 2021, eq. 12) from abar_t to abar_prev (abar_prev = 1
    means the clean data):
        x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
        sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)  (eq. 16).
    eta = 0 is deterministic DDIM; eta = 1 is DDPM's ancestral step. abar_*: python floats.
    x0_range = (lo, hi): clamp x0_hat into this box and recompute eps from it (the analogue of
    image DDPMs' clipping to the data range [-1, 1])."""
    x0 = (x_t - (1 - abar_t) ** 0.5 * eps) / abar_t ** 0.5
    if x0_range is not None:
        x0 = torch.maximum(torch.minimum(x0, x0_range[1]), x0_range[0])
        eps = (x_t - abar_t ** 0.5 * x0) / (1 - abar_t) ** 0.5
    sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) ** 0.5
    direction = max(1 - abar_prev - sigma ** 2, 0.0) ** 0.5 * eps
    return abar_prev ** 0.5 * x0 + direction + sigma * noise


@torch.no_grad()
def ddim_sample(model, y, dim, abar, steps, eta, generator, x=None, x0_range=None, bf16=False):
    """Draw x0 for labels y (B,) with `steps` DDIM steps over T (Song et al. 2021, eq. 12).
    The steps are T-1, ..., 0 evenly spaced, so the first step always starts from pure noise
    (ours; the DDIM paper spaces them from 0 and may never visit t = T). x: optional x_T (B, dim);
    all noise comes from the CPU `generator`; x0_range: see ddim_step. bf16: the model runs in
    bf16 autocast; the update steps stay in fp32."""
    device = y.device
    T = len(abar)
    ts = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long().unique_consecutive()
    if x is None:
        x = torch.randn(len(y), dim, generator=generator).to(device)
    for k, i in enumerate(ts.tolist()):
        abar_prev = abar[ts[k + 1]].item() if k + 1 < len(ts) else 1.0
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            eps = model(x, torch.full((len(y),), i, device=device, dtype=torch.long), y).float()
        noise = torch.randn(x.shape, generator=generator).to(device) if eta > 0 else 0.0
        x = ddim_step(x, eps, abar[i].item(), abar_prev, eta, noise, x0_range)
    return x


# -------------------------------------------------------------------------------------------------
# Batches: uint8 images from lt_data, augmented and normalised on the device.


def batches(dataset, batch_size, generator=None, workers=0, shard=False):
    """Yield (uint8 images, labels, indices). Shuffled with `generator` if given, else in order.
    In-memory datasets are sliced directly; datasets on disk go through a DataLoader. shard=True
    (training under several processes): `indices` is the whole global batch, the images and labels
    only this rank's rows of it (my_rows)."""
    n = len(dataset)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    chunks = list(order.split(batch_size))
    mine = [c[my_rows(len(c))] for c in chunks] if shard else chunks
    if hasattr(dataset, "images"):
        for idx, rows in zip(chunks, mine):
            yield dataset.images[rows], dataset.labels[rows], idx
        return
    loader = iter(torch.utils.data.DataLoader(
        dataset, batch_sampler=[m.tolist() for m in mine if len(m)], num_workers=workers))
    for idx, rows in zip(chunks, mine):
        if len(rows):  # a rank with no row of a small last batch yields an empty slice instead
            x, y = next(loader)
        yield x[:len(rows)], y[:len(rows)], idx


def augment_draws(n, generator, pad, flip):
    """The random draws of augment() for n samples, from the CPU `generator`: crop offsets dy, dx
    and (if flip, else None) flip flags, each (n, 1, 1, 1). Drawn for a whole global batch, they
    are applied to any rows of it with [d[rows] for d in draws]."""
    dy = torch.randint(0, 2 * pad + 1, (n, 1, 1, 1), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n, 1, 1, 1), generator=generator)
    m = (torch.rand(n, generator=generator) < 0.5).view(n, 1, 1, 1) if flip else None
    return dy, dx, m


def augment(x, draws, pad):
    """Random crop with `pad` zero padding and horizontal flip, per sample: x uint8 (B, C, H, W) on
    any device, draws = augment_draws(B, ...) (or rows of it) for these B samples."""
    B, C, H, W = x.shape
    dy, dx, m = (d if d is None else d.to(x.device) for d in draws)
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = (dy + torch.arange(H, device=x.device).view(1, 1, H, 1)).expand(B, C, H, W + 2 * pad)
    x = xp.gather(2, rows)  # (B, C, H, W + 2 pad)
    cols = (dx + torch.arange(W, device=x.device).view(1, 1, 1, W)).expand(B, C, H, W)
    x = x.gather(3, cols)  # (B, C, H, W)
    if m is not None:
        x = torch.where(m, x.flip(3), x)
    return x


def read_rows(dataset, idx):
    """(uint8 images, labels) of the dataset rows idx, read directly."""
    if hasattr(dataset, "images"):
        return dataset.images[idx], dataset.labels[idx]
    if len(idx) == 0:
        return dataset[0][0][None, :0], torch.zeros(0, dtype=torch.long)
    x, y = torch.utils.data.default_collate([dataset[i] for i in idx.tolist()])
    return x, y


def normalise(x, mean, std):
    """uint8 (B, C, H, W) -> float, scaled to [0, 1] then standardised per channel."""
    mean = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255.0 - mean) / std


# -------------------------------------------------------------------------------------------------
# Several processes and the speed switches. `torchrun --nproc_per_node N ldmlr.py ...` starts N
# processes (ranks), one per device. The training stages run on every rank under
# DistributedDataParallel (DDP): every rank draws the same global batch from the same seeded
# generators and computes the loss of its own rows of it; DDP averages the gradients. Rank 0 alone
# writes the files every rank shares. A plain `python ldmlr.py` is one rank, and all of this then
# leaves its computation as it was.


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    # Before the process group exists (while parsing flags) torchrun's RANK says which one we are.
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main():
    return rank() == 0


def barrier():
    """Wait until every rank is here (e.g. until rank 0 has written what the others read next)."""
    if world_size() > 1:
        dist.barrier()


def from_main(value):
    """Rank 0's `value` (small, picklable) on every rank, so that all ranks take its decisions."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(fn, *args, **kwargs):
    """fn(*args, **kwargs) on every rank. A BadInput or diverged loss it raises on any rank is
    raised on all of them: every rank then exits with its exit code (and rank 0 prints it),
    instead of waiting at the next collective for a rank that has gone."""
    result, error = None, None
    try:
        result = fn(*args, **kwargs)
    except (BadInput, FloatingPointError) as e:
        error = e
    if world_size() > 1:
        errors = [None] * world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise error
    return result


def on_main(fn, *args):
    """fn(*args) on rank 0 alone while the others wait (errors shared as by agree); its result on
    rank 0, None elsewhere."""
    return agree(lambda: fn(*args) if is_main() else None)


def dist_setup(cfg):
    """This process's device. Under torchrun (WORLD_SIZE > 1) also join the process group: NCCL
    with one GPU per process, GPU number LOCAL_RANK, on CUDA; gloo on CPU."""
    device = lt_data.pick_device(cfg.device)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise BadInput(f"several processes need --device cuda or cpu, not {device.type}")
    if not dist.is_initialized():
        # Long timeout: the other ranks wait at a barrier while rank 0 alone encodes every split,
        # which on ImageNet-LT (~185 k images) can outlast the default 10 minutes of NCCL.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=2))
    if min(cfg.batch_size, cfg.diff_batch) < world_size():
        raise BadInput(f"--batch-size and --diff-batch must be at least the number of processes, "
                       f"{world_size()}")
    return device


def dist_cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def my_rows(n):
    """This rank's rows of a global batch of n samples, a slice: the ranks take consecutive blocks
    of n // world rows, the first n % world ranks one row more (so rank 0 always has rows; another
    rank may have none when n < world size, and then still takes part in DDP's averaging)."""
    q, extra = divmod(n, world_size())
    start = rank() * q + min(rank(), extra)
    return slice(start, start + q + (rank() < extra))


def global_mean(loss, n):
    """The mean over a global batch of n samples of the per-sample `loss` (this rank's rows).
    DDP averages the ranks' gradients, so each rank returns its sum times world size / n: their
    average is then exactly the gradient of the global mean, also when n does not divide evenly
    (a per-rank mean would weigh the samples of a rank with fewer rows more). One process: the
    plain mean."""
    if world_size() == 1:
        return loss.mean()
    return loss.sum() * (world_size() / n)


def synced_mean(total, count):
    """total / count, averaged over ranks (each rank holds its global_mean sums): the one
    host-device sync of a log interval. Every rank gets the same number, so a diverged loss stops
    all ranks together."""
    if world_size() > 1:
        dist.all_reduce(total)
        total = total / world_size()
    return total.item() / count


def use_bf16(cfg, device):
    """--precision: bf16 autocast, or fp32. auto = bf16 on CUDA devices that support it, so CPU
    runs compute exactly as without the switch."""
    bf16_ok = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    if cfg.precision == "bf16" and not bf16_ok:
        raise BadInput(f"--precision bf16 is not supported on {device}; use --precision fp32")
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"
                                       and bf16_ok)


def autocast(device, bf16):
    """Context for a forward pass: with bf16, matrix products and convolutions run in bf16 (losses,
    norms and softmax stay fp32, autocast's rules); without, nothing changes."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def place(model, cfg, device):
    """`model` on the device, in channels_last memory format if --channels-last says so (auto: on
    CUDA, where cuDNN's convolutions, tensor-core ones above all, are faster in it). A convolution
    with channels_last weights returns channels_last activations: the inputs need no conversion."""
    model.to(device)
    if cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type == "cuda"):
        model.to(memory_format=torch.channels_last)
    return model


def for_training(model, cfg, device):
    """What a training loop calls: `model` wrapped in DDP under several processes, and compiled
    with --compile. The wrappers share `model`'s weights, so checkpoints keep saving `model`."""
    net = DDP(model, device_ids=[device] if device.type == "cuda" else None) \
        if world_size() > 1 else model
    return torch.compile(net) if cfg.compile else net


# -------------------------------------------------------------------------------------------------
# Stage 1 recipe: CE (optionally per-sample weighted) with SGD, warm-up and step decay.


def lr_at(epoch, cfg):
    """Linear warm-up over the first epochs, then x0.1 at 80% and 90% of training (160 / 180 of
    200 in the paper's recipe)."""
    if epoch < cfg.warmup_epochs:
        return cfg.lr * (epoch + 1) / cfg.warmup_epochs
    return cfg.lr * 0.1 ** ((epoch >= int(0.8 * cfg.epochs)) + (epoch >= int(0.9 * cfg.epochs)))


def mixup_draw(alpha, n, generator):
    """Mixup (Zhang et al. 2018): lam ~ Beta(alpha, alpha), one per batch, and a random pairing of
    the n samples. torch's Beta sampler takes no generator, so lam comes from a numpy Generator
    seeded by a draw from `generator`: every random number still derives from it."""
    seed = int(torch.randint(2 ** 62, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    return lam, torch.randperm(n, generator=generator)


def weighted_ce(logits, y, idx, weights):
    """Per-sample CE_i, times w_i = weights[idx_i] if weights is given."""
    loss = F.cross_entropy(logits, y, reduction="none")
    return loss if weights is None else loss * weights[idx].to(logits.device)


def all_finite(*modules):
    """True if every floating-point weight and buffer of the modules is finite. Checked before
    each checkpoint is written: an update can overflow although the loss before it was finite."""
    return all(bool(torch.isfinite(v).all()) for m in modules for v in m.state_dict().values()
               if v.is_floating_point())


def train_classifier(model, dataset, data, cfg, device, ckpt_path, weights=None, desc="classifier",
                     mixup_alpha=0.0):
    """Train `model` on `dataset` (uint8 images) with loss = mean_i w_i * CE_i (w = 1 if weights is
    None). mixup_alpha > 0 trains on mixed pairs, lam * CE(y_i) + (1 - lam) * CE(y_pair(i)) (the
    official LDMLR code uses 0.5); 0 = off, and then no extra random draw is made. One checkpoint
    per epoch; a rerun resumes from the last one. The batch order, the augmentation and the mixup
    draws of epoch e come from a generator seeded with (seed, e), so a resumed run matches an
    uninterrupted one. Under several processes every rank makes all these draws for the whole
    global batch and trains on its own rows of it (my_rows, global_mean)."""
    place(model, cfg, device)
    if world_size() > 1 and device.type == "cuda":
        # SyncBatchNorm: batch statistics over the global batch, as one process computes them.
        # Per-rank BatchNorm would normalise each rank's rows by the statistics of those rows
        # alone, a smaller, noisier batch that changes with the number of GPUs. torch implements
        # SyncBatchNorm for GPUs only; on CPU (gloo) each rank keeps per-rank statistics.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt_ = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9,
                           weight_decay=cfg.weight_decay)
    start = 0
    if os.path.isfile(ckpt_path):  # every rank resumes from the same checkpoint
        ckpt = lt_data.load_checkpoint(ckpt_path, keys=("epoch",),
                                       into={"model": model, "optimizer": opt_})
        start = ckpt["epoch"] + 1
        if is_main():
            print(f"[{desc}] resuming after {start} of {cfg.epochs} epochs")
    net, bf16 = for_training(model, cfg, device), use_bf16(cfg, device)
    if hasattr(dataset, "images"):  # in memory: on the device once, not batch by batch
        dataset = lt_data.TensorImages(dataset.images.to(device), dataset.labels.to(device))
    weights = None if weights is None else weights.to(device)
    pad, flip = max(1, data.image_size // 8), data.name != "digits"  # mirrored digits are not digits
    steps_per_epoch = -(-len(dataset) // cfg.batch_size)
    bar = tqdm(range(start, cfg.epochs), desc=desc, initial=start, total=cfg.epochs, unit="ep",
               disable=not is_main())
    for epoch in bar:
        for g in opt_.param_groups:
            g["lr"] = lr_at(epoch, cfg)
        model.train()
        gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
        total = torch.zeros((), device=device)
        t0 = time.time()
        for x, y, idx in batches(dataset, cfg.batch_size, gen, cfg.workers, shard=True):
            B, rows = len(idx), my_rows(len(idx))  # idx: the global batch; x, y: this rank's rows
            crop = augment_draws(B, gen, pad, flip)
            x = normalise(augment(x.to(device, non_blocking=True),
                                  [d if d is None else d[rows] for d in crop], pad),
                          data.mean, data.std)
            y = y.to(device, non_blocking=True)
            if mixup_alpha > 0:
                lam, perm = mixup_draw(mixup_alpha, B, gen)
                pair = perm[rows]  # the partners of this rank's rows, anywhere in the global batch
                if world_size() == 1:
                    x_pair, y_pair = x[pair.to(device)], y[pair.to(device)]
                else:  # partners may be rows of other ranks: read and augment them here
                    x_pair, y_pair = read_rows(dataset, idx[pair])
                    x_pair = normalise(augment(x_pair.to(device),
                                               [d if d is None else d[pair] for d in crop], pad),
                                       data.mean, data.std)
                    y_pair = y_pair.to(device)
                x = lam * x + (1 - lam) * x_pair
            with autocast(device, bf16):
                out = net(x).float()  # (rows, classes); the loss in fp32
            loss = weighted_ce(out, y, idx[rows], weights)
            if mixup_alpha > 0:
                loss = lam * loss + (1 - lam) * weighted_ce(out, y_pair, idx[pair], weights)
            loss = global_mean(loss, B)
            opt_.zero_grad(set_to_none=True)
            loss.backward()
            opt_.step()
            total += loss.detach()
        mean_loss = synced_mean(total, steps_per_epoch)  # one sync per epoch, not per step
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"{desc}: loss became {mean_loss} in epoch {epoch}; the last "
                                     f"good checkpoint is kept at {ckpt_path}")
        if not all_finite(model):
            raise FloatingPointError(f"{desc}: the weights became non-finite in epoch {epoch}; the "
                                     f"last good checkpoint is kept at {ckpt_path}")
        bar.set_postfix(loss=f"{mean_loss:.3f}", img_s=f"{len(dataset) / (time.time() - t0):.0f}")
        if is_main():
            lt_data.atomic_save({"model": model.state_dict(), "optimizer": opt_.state_dict(),
                                 "epoch": epoch, "config": dataclasses.asdict(cfg)}, ckpt_path)
    return model


@torch.no_grad()
def predict(model, dataset, data, device, batch_size=512, workers=0):
    """Logits (N, C) and penultimate features (N, D) on un-augmented images, in dataset order."""
    model.eval().to(device)
    logits, feats = [], []
    for x, _, _ in batches(dataset, batch_size, None, workers):
        f = model.features(normalise(x.to(device), data.mean, data.std))
        feats.append(f.float().cpu())
        logits.append(model.fc(f).float().cpu())
    return torch.cat(logits), torch.cat(feats)


# -------------------------------------------------------------------------------------------------
# Losses and the small training loops of LDMLR: the denoiser on features, the linear head.


def diffusion_loss(model, x0, y, abar, generator, rows=slice(None)):
    """Simplified DDPM objective (Ho et al. 2020, Algorithm 1 / eq. 14):
    E_{t, eps} ||eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, y)||^2,
    t uniform over the T steps, eps ~ N(0, I); the draws come from the CPU `generator`. Under
    several processes x0, y are the global batch: the draws are made for all of it, and the loss
    covers this rank's `rows` (my_rows), scaled for DDP's averaging (global_mean)."""
    t = torch.randint(0, len(abar), (len(x0),), generator=generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    n, x0, y, t, eps = len(x0), x0[rows], y[rows], t[rows], eps[rows]
    pred = model(q_sample(x0, t, eps, abar), t, y).float()  # fp32 also under bf16 autocast
    if world_size() == 1:
        return F.mse_loss(pred, eps)
    return global_mean(F.mse_loss(pred, eps, reduction="none").mean(1), n)


def balanced_indices(labels, n, generator):
    """n indices drawn with replacement so that every class present in `labels` is equally likely
    (class uniform, then an instance uniform within the class): the class-balanced sampler of cRT
    (Kang et al. 2020)."""
    labels = labels.cpu()
    order = torch.argsort(labels, stable=True)  # instances grouped by class
    classes, counts = torch.unique(labels, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    pick = torch.randint(0, len(classes), (n,), generator=generator)
    within = (torch.rand(n, generator=generator, dtype=torch.float64) * counts[pick]).long()
    return order[starts[pick] + within.clamp(max=counts[pick] - 1)]


def generation_counts(counts, ratio, generate_for="all", fill=False, n_max=None):
    """Pseudo-features per class: max(round(ratio * n_c), 5) (the official code's rule and its
    Python round), or n_max - n_c with fill; 0 for classes outside the chosen shot group."""
    groups = lt_data.shot_groups(counts)
    chosen = set(range(len(counts))) if generate_for == "all" else set(groups[generate_for])
    out = []
    for c, n in enumerate(counts):
        if c not in chosen:
            out.append(0)
        elif fill:
            out.append(max(int(n_max) - int(n), 0))
        else:
            out.append(max(round(ratio * n), 5))
    return out


def train_linear(fc, feats, labels, cfg, device, seed, balanced=False, desc="finetune"):
    """Retrain only the final linear layer `fc` (initialised from the CE model's) on fixed features
    with CE and Adam (LDMLR: lr 1e-3, wd 1e-5, batch 1024). An epoch is one pass over the data in
    a random order, or (balanced, for cRT) len(feats) class-balanced draws. The LAST epoch is
    returned: nothing is selected on the test set (the official code picks the best test epoch).
    Cheap next to the other stages, so it has no checkpoint: an interrupted run redoes it."""
    fc = fc.to(device)
    feats, labels = feats.to(device), labels.to(device)
    opt_ = torch.optim.Adam(fc.parameters(), lr=cfg.ft_lr, weight_decay=cfg.ft_weight_decay)
    n = len(labels)
    bar = tqdm(range(cfg.ft_epochs), desc=desc, unit="ep")
    for epoch in bar:
        gen = torch.Generator().manual_seed(seed * 100003 + epoch)
        order = balanced_indices(labels, n, gen) if balanced else torch.randperm(n, generator=gen)
        total = torch.zeros((), device=device)
        for i in range(0, n, cfg.ft_batch):
            idx = order[i:i + cfg.ft_batch].to(device)
            loss = F.cross_entropy(fc(feats[idx]), labels[idx])
            opt_.zero_grad(set_to_none=True)
            loss.backward()
            opt_.step()
            total += loss.detach()
        if (epoch + 1) % 50 == 0 or epoch + 1 == cfg.ft_epochs:  # sync only now and then
            mean_loss = total.item() / -(-n // cfg.ft_batch)
            if not torch.isfinite(torch.tensor(mean_loss)):
                raise FloatingPointError(f"{desc}: loss became {mean_loss} in epoch {epoch}")
            bar.set_postfix(loss=f"{mean_loss:.3g}")
    return fc.cpu()


# -------------------------------------------------------------------------------------------------
# Stages: <out>/<stage>/ holds a stage's files; <out>/<stage>/done.json marks it finished.


def stage_dir(cfg, stage):
    path = os.path.join(cfg.out, stage)
    os.makedirs(path, exist_ok=True)
    return path


def is_done(cfg, stage):
    return os.path.isfile(os.path.join(cfg.out, stage, "done.json"))


def mark_done(cfg, stage, info):
    lt_data.atomic_json(info, os.path.join(cfg.out, stage, "done.json"))


def read_done(cfg, stage):
    path = os.path.join(cfg.out, stage, "done.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        raise BadInput(f"{path} is unreadable; rerun with --redo {stage}") from None


def redo_from(cfg, stage):
    """--redo STAGE: forget STAGE and every later stage."""
    for s in STAGES[STAGES.index(stage):]:
        shutil.rmtree(os.path.join(cfg.out, s), ignore_errors=True)
    if os.path.exists(os.path.join(cfg.out, "results.json")):
        os.remove(os.path.join(cfg.out, "results.json"))


def print_table(rows):
    """The rows of results.json as a small table."""
    def fmt(v):
        return "   -  " if v is None else f"{v:6.2f}"
    print(f"{'row':<14}{'overall':>8}{'many':>8}{'medium':>8}{'few':>8}")
    for name, r in rows.items():
        print(f"{name:<14}{fmt(r['overall']):>8}{fmt(r['many']):>8}{fmt(r['medium']):>8}"
              f"{fmt(r['few']):>8}")


def load_features(cfg):
    """What the encode stage saved: {split: {"features", "labels", "logits"}, "fc": CE head}."""
    return lt_data.load_checkpoint(os.path.join(cfg.out, "encode", "features.pt"), keys=("train",))


def load_pseudo(cfg, data, dim):
    """What the generate stage saved: {"features", "labels", "counts"}, checked. A file of another
    feature size, with labels outside the classes or other counts than this run generates (from
    another run, say) is BadInput here instead of a crash or a silent mix in the final layer."""
    path = os.path.join(cfg.out, "generate", "pseudo.pt")
    pseudo = lt_data.load_checkpoint(path, keys=("features", "labels", "counts"))
    x, y, counts = pseudo["features"], pseudo["labels"], pseudo["counts"]
    C = data.num_classes
    expected = generation_counts(data.train_counts, cfg.ratio, cfg.generate_for, cfg.fill,
                                 data.n_max)
    if not (torch.is_tensor(x) and x.is_floating_point() and x.ndim == 2 and x.shape[1] == dim):
        problem = (f"features {getattr(x, 'dtype', type(x).__name__)} "
                   f"{tuple(getattr(x, 'shape', ()))}, the encoder's are float (N, {dim})")
    elif not torch.isfinite(x).all():
        problem = "non-finite features"
    elif not (torch.is_tensor(y) and y.dtype == torch.long and y.shape == (len(x),)):
        problem = f"labels that are not {len(x)} int64 class indices"
    elif ((y < 0) | (y >= C)).any():
        problem = f"labels outside 0..{C - 1}"
    elif torch.bincount(y, minlength=C).tolist() != expected or list(counts) != expected:
        problem = f"other per-class counts than this run generates ({expected})"
    else:
        return pseudo
    raise BadInput(f"{path} holds {problem}; rerun with --redo generate")


def ce_head(enc, num_classes):
    """A fresh copy of the CE model's final linear layer."""
    fc = nn.Linear(enc["fc"]["weight"].shape[1], num_classes)
    fc.load_state_dict(enc["fc"])
    return fc


def stage_encoder(cfg, data, device):
    """Stage 1: the CE classifier on the long-tailed images (shared recipe with diffult.py)."""
    folder = stage_dir(cfg, "encoder")
    # Stage-1 init from torch.manual_seed(seed), as diffult.py's baseline stage: with the same seed
    # both scripts train the same CE model, so their CE rows are one shared baseline.
    torch.manual_seed(cfg.seed)
    model = make_classifier(cfg.arch, data.num_classes, data.channels)
    train_classifier(model, data.train, data, cfg, device, os.path.join(folder, "ckpt.pt"),
                     desc="encoder", mixup_alpha=cfg.mixup)
    if is_main():
        lt_data.atomic_save({"model": model.state_dict(), "config": dataclasses.asdict(cfg)},
                            os.path.join(folder, "model.pt"))
    return {"epochs": cfg.epochs}


def stage_encode(cfg, data, device):
    """Stage 2: penultimate features (un-augmented images) and CE logits of every split."""
    model = make_classifier(cfg.arch, data.num_classes, data.channels)
    lt_data.load_checkpoint(os.path.join(cfg.out, "encoder", "model.pt"), into={"model": model})
    out = {"fc": {k: v.cpu() for k, v in model.fc.state_dict().items()}}
    for split in ("train", "val", "test"):
        dataset = getattr(data, split)
        if dataset is None:
            continue
        logits, feats = predict(model, dataset, data, device, workers=cfg.workers)
        out[split] = {"features": feats, "labels": dataset.labels.clone(), "logits": logits}
    lt_data.atomic_save(out, os.path.join(stage_dir(cfg, "encode"), "features.pt"))
    return {"feature_dim": out["train"]["features"].shape[1],
            "splits": [s for s in ("train", "val", "test") if s in out]}


def stage_diffusion(cfg, data, device):
    """Stage 3: class-conditional DDPM on the train features, standardised per dimension with the
    real features' mean / std (undone after sampling; the official code instead clips raw
    post-ReLU features to [-1, 1], which truncates them). Checkpoint every ckpt_every steps with
    model, EMA, optimizer, step and generator state; a rerun resumes from the last one."""
    folder = stage_dir(cfg, "diffusion")
    enc = load_features(cfg)
    feats, labels = enc["train"]["features"], enc["train"]["labels"]
    mu, sd = feats.mean(0), feats.std(0).clamp(min=1e-6)  # constant (dead) dimensions stay 0
    x_all, y_all = ((feats - mu) / sd).to(device), labels.to(device)  # (N, D), (N,)
    _, abar = cosine_schedule(cfg.timesteps)
    abar = abar.to(device)
    model = Denoiser(feats.shape[1], data.num_classes, cfg.diff_width, cfg.diff_blocks).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt_ = torch.optim.Adam(model.parameters(), lr=cfg.diff_lr)
    gen = torch.Generator().manual_seed(cfg.seed * 100003 + 7)
    step, ckpt_path = 0, os.path.join(folder, "ckpt.pt")
    if os.path.isfile(ckpt_path):  # every rank resumes from the same checkpoint
        ckpt = lt_data.load_checkpoint(ckpt_path, keys=("generator", "step"),
                                       into={"model": model, "ema": ema, "optimizer": opt_})
        gen.set_state(ckpt["generator"])
        step = ckpt["step"]
        if is_main():
            print(f"[diffusion] resuming at step {step}")
    # Uniform minibatches over instances by default, as the official code: with the class
    # embedding the model still learns every class, and each tail feature is still seen thousands
    # of times; class-balanced batches (--diff-sampling balanced) would replay the 5-sample tail
    # classes ~20x more often on digits and invite memorising them.
    n, log_every = len(y_all), min(100, cfg.ckpt_every)
    total, since, mean_loss = torch.zeros((), device=device), 0, None
    bar = tqdm(range(step, cfg.diff_steps), desc="diffusion", initial=step, total=cfg.diff_steps,
               unit="step", disable=not is_main())
    # Every rank draws the same global batch idx from `gen` and trains on its rows of it.
    net, bf16 = for_training(model, cfg, device), use_bf16(cfg, device)
    rows = my_rows(cfg.diff_batch)
    for step in bar:
        idx = (balanced_indices(labels, cfg.diff_batch, gen) if cfg.diff_sampling == "balanced"
               else torch.randint(0, n, (cfg.diff_batch,), generator=gen)).to(device)
        with autocast(device, bf16):
            loss = diffusion_loss(net, x_all[idx], y_all[idx], abar, gen, rows)
        opt_.zero_grad(set_to_none=True)
        loss.backward()
        opt_.step()
        # EMA with the usual warm-up min(decay, (1 + k) / (10 + k)) (ours), so short runs are not
        # dominated by the random initialisation.
        decay = min(cfg.diff_ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - decay)
        total += loss.detach()
        since += 1
        done = step + 1
        if done % log_every == 0 or done % cfg.ckpt_every == 0 or done == cfg.diff_steps:
            mean_loss = synced_mean(total, since)  # one sync per log interval
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"diffusion: loss became {mean_loss} near step {done}; "
                                         f"the last good checkpoint is kept at {ckpt_path}")
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            total, since = torch.zeros((), device=device), 0
        if done % cfg.ckpt_every == 0 or done == cfg.diff_steps:
            if not all_finite(model, ema):
                raise FloatingPointError(f"diffusion: the weights became non-finite by step "
                                         f"{done}; the last good checkpoint is kept at {ckpt_path}")
            if is_main():
                lt_data.atomic_save({"model": model.state_dict(), "ema": ema.state_dict(),
                                     "optimizer": opt_.state_dict(), "step": done,
                                     "generator": gen.get_state(), "mu": mu, "sd": sd,
                                     "config": dataclasses.asdict(cfg)}, ckpt_path)
    return {"steps": cfg.diff_steps, "final_loss": mean_loss}


def load_denoiser(cfg, data, dim, device):
    """The EMA denoiser and the standardisation of the diffusion stage."""
    model = Denoiser(dim, data.num_classes, cfg.diff_width, cfg.diff_blocks)
    ckpt = lt_data.load_checkpoint(os.path.join(cfg.out, "diffusion", "ckpt.pt"), keys=("mu", "sd"),
                                   into={"ema": model})
    return model.to(device).eval(), ckpt["mu"], ckpt["sd"]


def stage_generate(cfg, data, device):
    """Stage 4: DDIM pseudo-features per class, mapped back to the encoder's feature space."""
    enc = load_features(cfg)
    dim = enc["train"]["features"].shape[1]
    model, mu, sd = load_denoiser(cfg, data, dim, device)
    _, abar = cosine_schedule(cfg.timesteps)
    counts = generation_counts(data.train_counts, cfg.ratio, cfg.generate_for, cfg.fill, data.n_max)
    labels = torch.repeat_interleave(torch.arange(data.num_classes), torch.tensor(counts))
    # Why the box: with the cosine schedule abar_T ~ 2e-9, so the first x0 prediction divides
    # the model's eps error by sqrt(abar_T) ~ 5e-5 and lands thousands of standard deviations
    # away (measured on digits: |x0| up to ~7000 without it). The real standardised features all
    # lie in this box, so clamping to it never truncates a realistic feature.
    z_real = (enc["train"]["features"] - mu) / sd
    box = (z_real.min(0).values.to(device), z_real.max(0).values.to(device)) \
        if cfg.clip_x0 == "box" else None
    gen = torch.Generator().manual_seed(cfg.seed * 100003 + 11)
    feats, bf16 = [], use_bf16(cfg, device)
    for i in tqdm(range(0, len(labels), 1024), desc="generate", unit="batch"):
        z = ddim_sample(model, labels[i:i + 1024].to(device), dim, abar, cfg.sample_steps,
                        cfg.eta, gen, x0_range=box, bf16=bf16)
        feats.append(z.cpu() * sd + mu)  # undo the standardisation; no clipping
    feats = torch.cat(feats) if feats else torch.zeros(0, dim)
    if not torch.isfinite(feats).all():
        raise FloatingPointError("generate: the sampler produced non-finite features; retrain "
                                 "the diffusion stage (--redo diffusion)")
    lt_data.atomic_save({"features": feats, "labels": labels, "counts": counts},
                        os.path.join(stage_dir(cfg, "generate"), "pseudo.pt"))
    return {"counts": counts, "total": len(labels)}


def stage_finetune(cfg, data, device):
    """Stage 5: the final linear layer retrained from the CE head on real + pseudo features
    (LDMLR), and on real features with class-balanced sampling (cRT, Kang et al. 2020). Kang et
    al. re-initialise the layer for cRT; ours starts from the CE head like the LDMLR row, so the
    two rows differ only in the data they see (pseudo-features vs re-balanced real ones)."""
    enc = load_features(cfg)
    pseudo = load_pseudo(cfg, data, enc["train"]["features"].shape[1])
    feats = torch.cat([enc["train"]["features"], pseudo["features"]])
    labels = torch.cat([enc["train"]["labels"], pseudo["labels"]])
    ldmlr = train_linear(ce_head(enc, data.num_classes), feats, labels, cfg, device,
                         seed=cfg.seed * 3 + 1, desc="finetune LDMLR")
    crt = train_linear(ce_head(enc, data.num_classes), enc["train"]["features"],
                       enc["train"]["labels"], cfg, device, seed=cfg.seed * 3 + 2, balanced=True,
                       desc="finetune cRT")
    prior = [n + g for n, g in zip(data.train_counts, pseudo["counts"])]
    lt_data.atomic_save({"ldmlr": ldmlr.state_dict(), "crt": crt.state_dict(),
                         "ldmlr_prior_counts": prior},
                        os.path.join(stage_dir(cfg, "finetune"), "heads.pt"))
    return {"ldmlr_prior_counts": prior}


def frechet_or_none(real, fake):
    """The Frechet distance only where both sets have more samples than the feature dimension:
    with fewer, the covariance estimate is rank-deficient and the distance mostly measures that."""
    dim = real.shape[1]
    if len(real) <= dim or len(fake) <= dim:
        return None
    return lt_data.frechet_distance(real, fake)


def stage_evaluate(cfg, data, device):
    """Stage 6: the rows on the evaluation split and the quality of the pseudo-features."""
    enc = load_features(cfg)
    ldmlr, crt = ce_head(enc, data.num_classes), ce_head(enc, data.num_classes)
    heads = lt_data.load_checkpoint(os.path.join(cfg.out, "finetune", "heads.pt"),
                                    keys=("ldmlr_prior_counts",), into={"ldmlr": ldmlr, "crt": crt})
    pseudo = load_pseudo(cfg, data, enc["train"]["features"].shape[1])
    split = enc[cfg.eval_split]
    feats, labels, ce_logits = split["features"], split["labels"], split["logits"]
    with torch.no_grad():
        ldmlr_logits, crt_logits = ldmlr(feats), crt(feats)
    counts = data.train_counts

    def row(logits):
        return lt_data.accuracy_report(logits.argmax(1), labels, counts)

    rows = {
        "CE": row(ce_logits),
        # Post-hoc logit adjustment (Menon et al. 2021; the official "label shift" row): the prior
        # is the distribution the head was trained on, real counts for CE, real + pseudo for LDMLR.
        "LA": row(lt_data.logit_adjust(ce_logits, counts, cfg.tau)),
        "CE+LDMLR": row(ldmlr_logits),
        "LA+LDMLR": row(lt_data.logit_adjust(ldmlr_logits, heads["ldmlr_prior_counts"], cfg.tau)),
        "cRT": row(crt_logits),
    }
    real_f, real_y = enc["train"]["features"], enc["train"]["labels"]
    fake_f, fake_y = pseudo["features"], pseudo["labels"]
    # In-domain Frechet distance in the encoder's feature space (not the Inception FID the papers
    # report for images). Overall it also reflects that the class mix of the pseudo-features
    # differs from the real one.
    generated = {
        "counts": pseudo["counts"], "total": len(fake_y), "feature_dim": real_f.shape[1],
        "frechet": frechet_or_none(real_f, fake_f),
        "frechet_per_class": [frechet_or_none(real_f[real_y == c], fake_f[fake_y == c])
                              for c in range(data.num_classes)],
    }
    lt_data.atomic_json({"rows": rows, "generated": generated},
                        os.path.join(stage_dir(cfg, "evaluate"), "rows.json"))
    return {"eval_split": cfg.eval_split,
            "overall": {name: r["overall"] for name, r in rows.items()}}


STAGE_FNS = {"encoder": stage_encoder, "encode": stage_encode, "diffusion": stage_diffusion,
             "generate": stage_generate, "finetune": stage_finetune, "evaluate": stage_evaluate}


def run(cfg):
    """The whole pipeline: skip finished stages, resume an unfinished one, write results.json.
    Under torchrun every rank runs this; rank 0 alone writes the shared files."""
    device = dist_setup(cfg)
    load = (cfg.dataset, cfg.data_root, cfg.imb, cfg.seed)
    if cfg.download and world_size() > 1:  # one download, by rank 0, before any rank reads it
        on_main(lambda: lt_data.load_dataset(*load, True, image_size=cfg.image_size))
    data = agree(lt_data.load_dataset, *load, cfg.download, image_size=cfg.image_size)
    if cfg.eval_split == "val" and data.val is None:
        raise BadInput(f"--eval-split val needs a validation split and {cfg.dataset} has none "
                       f"here; use --eval-split test")
    config = dataclasses.asdict(cfg)
    may_change = [f for s in STAGES[STAGES.index(cfg.redo):] for f in REDO_FIELDS.get(s, ())] \
        if cfg.redo else []

    def prepare():  # rank 0 alone: the others would race it for config.json and the --redo
        lt_data.check_run_dir(cfg.out, config, ignore=NOT_RESULTS, may_change=may_change)
        if cfg.redo:
            redo_from(cfg, cfg.redo)
            lt_data.atomic_json(config, os.path.join(cfg.out, "config.json"))  # describes all now
        return [is_done(cfg, stage) for stage in STAGES]

    done = from_main(on_main(prepare))  # every rank skips the stages rank 0 found done
    # ---- seeding: global RNGs (model init) are reseeded before every stage, so a stage computes
    # the same whether or not the stages before it ran in this process (the encoder stage then
    # seeds its own init as diffult.py does). Data order and noise use explicit generators.
    lt_data.seed_everything(cfg.seed)
    # The encoder and the feature diffusion train on every rank; the other stages are one pass
    # over the images or small computations on features: rank 0 does them alone.
    alone = ("encode", "generate", "finetune", "evaluate")
    timing = {}
    for i, (stage, finished) in enumerate(zip(STAGES, done)):
        if finished:
            if is_main():
                print(f"[{stage}] done, skipped")
                timing[stage] = read_done(cfg, stage)["seconds"]
            continue
        lt_data.seed_everything(cfg.seed + 1_000_003 * i)
        t0 = time.time()
        fn = STAGE_FNS[stage]
        info = on_main(fn, cfg, data, device) if stage in alone else fn(cfg, data, device)
        barrier()  # the stage is done when every rank is
        if is_main():
            timing[stage] = info["seconds"] = round(time.time() - t0, 2)
            mark_done(cfg, stage, info)
    if not is_main():
        return None
    with open(os.path.join(cfg.out, "evaluate", "rows.json")) as f:
        evaluated = json.load(f)
    results = {"method": "ldmlr", "dataset": cfg.dataset, "imb": cfg.imb, "seed": cfg.seed,
               "train_counts": data.train_counts,
               "rows": evaluated["rows"], "generated": evaluated["generated"],
               "timing_s": timing, "config": dataclasses.asdict(cfg)}
    lt_data.atomic_json(results, os.path.join(cfg.out, "results.json"))
    print_table(results["rows"])
    return results



def main(argv=None):
    # Under torchrun every rank meets the same bad input (same flags and files) or is told of it
    # (agree, on_main) and exits with its code; rank 0 alone prints the line.
    try:
        cfg = parse_config(argv)
        run(cfg)
    except BadInput as e:
        if is_main():
            print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # a diverged loss: say so in one line, keep the checkpoints
        if is_main():
            print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if is_main():
            print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        dist_cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
