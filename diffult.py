"""DiffuLT: class-conditional pixel-space diffusion for long-tailed recognition, in one file.

J. Shao et al., "DiffuLT: Diffusion for Long-tail Recognition Without External Knowledge",
NeurIPS 2024 (arXiv 2403.05170). No official code is public; the generator is the
Class-Balancing Diffusion Model of Y. Qin et al., CVPR 2023 (CBDM), on the DDPM of Ho et al. 2020.

Pipeline (one folder per stage under --out, each cached and resumable):
  baseline    ResNet-32 with plain CE on the long-tailed set: the CE row and the feature extractor
              phi; class centres c_y and radii d_f(y) of the real training features
  diffusion   class-conditional DDPM UNet trained from scratch with the CBDM regulariser and the
              AID-biased loss L_AID through frozen phi (label dropout for classifier-free guidance)
  generate    every class topped up to N_t images with the EMA model (DDIM or ancestral DDPM)
  filter      each sample is ID / AID / OOD by its phi-distance to its class centre; OOD dropped
  classifier  a fresh classifier on real + kept synthetic images, synthetic CE weighted by omega
  evaluate    rows CE, LA (post-hoc logit adjustment), DiffuLT, DiffuLT+LA

    python diffult.py --dataset digits --imb 20          # offline, 2 CPU cores, a few minutes
    python diffult.py --dataset cifar100 --imb 100       # the paper's setting (GPU, ~a day)
    torchrun --nproc_per_node 4 diffult.py --dataset cifar100 --imb 100   # on 4 GPUs (DDP)

Measured on digits, r = 20, test top-1 %, mean of seeds 0, 1, 2 (overall / Few), with
OMP_NUM_THREADS=1 DATASETS=digits RATIOS=20 SEEDS="0 1 2" bash run_all.sh (README):
    CE 93.17 / 84.79   LA 94.33 / 87.71   DiffuLT 94.67 / 90.21   DiffuLT+LA 95.00 / 91.67
Generated: 54.7 % ID, 35.1 % AID, 10.3 % OOD (dropped). One run takes 92 s on two idle CPU cores
(median of 3, /usr/bin/time). DDIM against DDPM-1000, and how the defaults were chosen: README.
"""
import argparse
import dataclasses
import datetime
import json
import math
import os
import shutil
import sys
import time
import zlib
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
    redo: str = opt(None, "recompute this stage and every stage after it",
                    ("baseline", "diffusion", "generate", "filter", "classifier", "evaluate"))
    eval_split: str = opt("test", "evaluate on the test set, or on the validation split carved "
                          "from the training data (digits, ImageNet-LT) when tuning", ("test", "val"))
    workers: int = opt(4, "DataLoader workers for datasets read from disk (ImageNet-LT)")
    precision: str = opt("auto", "forward passes of training and sampling in bf16 autocast or "
                         "fp32; auto = bf16 on CUDA devices that support it, else fp32",
                         ("auto", "fp32", "bf16"))
    channels_last: str = opt("auto", "channels_last memory format for the conv nets; auto = on "
                             "CUDA only", ("auto", "on", "off"))
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
    # ---- DiffuLT: the generator (CBDM / pytorch-ddpm CIFAR configuration unless noted)
    gen_size: int = opt(None, "image side the diffusion model works at (CIFAR 32; digits 8; "
                        "imagenet_lt 64, ours)")
    unet_ch: int = opt(None, "UNet base channels (pytorch-ddpm / CBDM: 128)")
    unet_mult: str = opt(None, "UNet channel multiplier per level, comma-separated "
                         "(CBDM: 1,2,2,2)")
    unet_blocks: int = opt(None, "residual blocks per UNet level (CBDM: 2)")
    unet_attn: str = opt(None, "resolutions with self-attention, comma-separated (CBDM: 16)")
    unet_dropout: float = opt(None, "UNet dropout (CBDM: 0.1)")
    timesteps: int = opt(1000, "diffusion steps T (DDPM / CBDM: 1000)")
    beta_1: float = opt(1e-4, "first beta of the linear schedule (DDPM: 1e-4)")
    beta_T: float = opt(0.02, "last beta of the linear schedule (DDPM: 0.02)")
    diffusion_steps: int = opt(None, "diffusion training steps (CBDM: 300k on CIFAR-100-LT)")
    diffusion_batch: int = opt(None, "diffusion batch size (CBDM: 48)")
    diffusion_lr: float = opt(None, "Adam learning rate of the denoiser (CBDM: 2e-4)")
    diffusion_warmup: int = opt(None, "linear learning-rate warm-up steps (CBDM: 5000)")
    ema_decay: float = opt(None, "EMA decay of the denoiser weights used for sampling "
                           "(CBDM: 0.9999)")
    grad_clip: float = opt(1.0, "gradient-norm clip of the denoiser (CBDM: 1.0)")
    ckpt_every: int = opt(None, "diffusion checkpoint interval in steps")
    label_dropout: float = opt(0.1, "probability of replacing the label by the null class, for "
                               "classifier-free guidance (CBDM: 0.1)")
    tau: float = opt(1.0, "CBDM regulariser weight tau (CBDM / DiffuLT: 1; 0 = plain DDPM)")
    gamma: float = opt(0.25, "CBDM commitment weight gamma (CBDM: 0.25)")
    cbdm_prior: str = opt("uniform", "distribution of the CBDM target label y' (paper: uniform; "
                          "the official CBDM code: empirical)", ("uniform", "empirical"))
    alpha: float = opt(0.1, "weight of the AID-biased loss L_AID (DiffuLT: 0.1; 0 = off)")
    # ---- DiffuLT: generation, filtering, retraining
    sampler: str = opt("ddim", "ddim (fast, ours as default) or ddpm (all T ancestral steps, "
                       "as CBDM samples)", ("ddim", "ddpm"))
    sample_steps: int = opt(None, "DDIM steps (ours; ignored by --sampler ddpm)")
    eta: float = opt(0.0, "DDIM stochasticity eta (0 = deterministic DDIM)")
    guidance: float = opt(1.6, "classifier-free guidance w in CBDM's convention "
                          "eps = (1 + w) eps(y) - w eps(null) (CBDM: 1.6; 0 = no guidance)")
    target_count: int = opt(None, "N_t: every class is topped up to this many images "
                            "(paper: n_max, the head count)")
    gen_batch: int = opt(None, "images per generation shard (one shard = one saved file)")
    no_filter: bool = opt(False, "keep OOD samples too (ablation; the paper drops them)")
    synthetic_weight: float = opt(None, "CE weight omega of synthetic samples (paper: 0.3; "
                                  "0.5 on ImageNet-LT; real samples weigh 1)")


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
# DiffuLT's own per-dataset defaults, merged into DEFAULTS below. CIFAR: the pytorch-ddpm / CBDM
# CIFAR UNet (~35.7 M parameters) and CBDM's CIFAR-100-LT budget (300k steps at batch 48; using
# the same budget for CIFAR-10-LT is ours); 100 DDIM steps is ours (CBDM samples with all 1000).
# ImageNet-LT: the paper trains its generator for ~6 days and does not give the configuration;
# everything below is ours: 64x64 generation (upsampled to the classifier's input), a wider
# 4-level UNet with attention at 16 and 8.
# digits (ours): an 8x8 one-channel UNet and budgets sized for 2 CPU cores; the generation and
# retraining settings (guidance, omega, filter) were checked on the validation split (README).
GEN_DEFAULTS = {
    "cifar10": dict(gen_size=32, unet_ch=128, unet_mult="1,2,2,2", unet_blocks=2, unet_attn="16",
                    unet_dropout=0.1, diffusion_steps=300_000, diffusion_batch=48,
                    diffusion_lr=2e-4, diffusion_warmup=5000, ema_decay=0.9999, ckpt_every=5000,
                    sample_steps=100, gen_batch=500, synthetic_weight=0.3),
    "cifar100": dict(gen_size=32, unet_ch=128, unet_mult="1,2,2,2", unet_blocks=2, unet_attn="16",
                     unet_dropout=0.1, diffusion_steps=300_000, diffusion_batch=48,
                     diffusion_lr=2e-4, diffusion_warmup=5000, ema_decay=0.9999, ckpt_every=5000,
                     sample_steps=100, gen_batch=500, synthetic_weight=0.3),
    "imagenet_lt": dict(gen_size=64, unet_ch=128, unet_mult="1,2,3,4", unet_blocks=2,
                        unet_attn="16,8", unet_dropout=0.1, diffusion_steps=500_000,
                        diffusion_batch=128, diffusion_lr=2e-4, diffusion_warmup=5000,
                        ema_decay=0.9999, ckpt_every=5000, sample_steps=100, gen_batch=500,
                        synthetic_weight=0.5),
    "digits": dict(gen_size=8, unet_ch=16, unet_mult="1,2", unet_blocks=1, unet_attn="4",
                   unet_dropout=0.1, diffusion_steps=600, diffusion_batch=64, diffusion_lr=2e-3,
                   diffusion_warmup=50, ema_decay=0.99, ckpt_every=200, sample_steps=25,
                   gen_batch=256, synthetic_weight=0.3),
}
for _name, _extra in GEN_DEFAULTS.items():
    DEFAULTS[_name].update(_extra)
SMOKE = dict(epochs=2, unet_ch=16, unet_blocks=1, diffusion_steps=6, diffusion_batch=16,
             diffusion_warmup=2, ckpt_every=3, sample_steps=3, target_count=30, gen_batch=32)
# Fields that do not change results: a run directory may be reused with other values of them.
# channels_last and compile are here because they change which kernels compute the same operations
# (another memory layout, summation order or convolution algorithm; compiled dropout may also draw
# its masks from another random stream), not the operations: the numbers then differ as they do
# between two devices, and --device is here too. precision is not: bf16 keeps 8 significant bits,
# and that is another computation.
NOT_RESULTS = ("out", "device", "data_root", "download", "redo", "workers", "channels_last",
               "compile")
# Fields that no stage before the named one reads: `--redo STAGE` may change them in an existing run
# directory (--redo diffusion --tau 0 reuses the CE baseline; --redo generate --sampler ddpm reuses
# the trained generator too).
REDO_FIELDS = {"diffusion": ("gen_size", "unet_ch", "unet_mult", "unet_blocks", "unet_attn",
                             "unet_dropout", "timesteps", "beta_1", "beta_T", "diffusion_steps",
                             "diffusion_batch", "diffusion_lr", "diffusion_warmup", "ema_decay",
                             "grad_clip", "ckpt_every", "label_dropout", "tau", "gamma",
                             "cbdm_prior", "alpha"),
               "generate": ("sampler", "sample_steps", "eta", "guidance", "target_count",
                            "gen_batch"),
               "filter": ("no_filter",), "classifier": ("synthetic_weight",),
               "evaluate": ("eval_split",)}


class ArgParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, not argparse's usage block
        raise BadInput(message)


def parse_config(argv=None, method="diffult"):
    parser = ArgParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(Config):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        if f.type is bool or f.type == "bool":
            parser.add_argument(flag, action="store_true", help=meta["help"].replace("%", "%%"))
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
    values.update({k: v for k, v in args.items() if v is not None and v is not False})
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
    if cfg.dataset != "imagenet_lt" and cfg.gen_size != cfg.image_size:
        raise BadInput(f"--gen-size must equal the image size {cfg.image_size} on {cfg.dataset}")
    cfg_unet(cfg)  # parses and checks the UNet fields
    for name in ("timesteps", "diffusion_steps", "diffusion_batch", "diffusion_warmup",
                 "ckpt_every", "sample_steps", "gen_batch", "unet_ch", "unet_blocks"):
        if getattr(cfg, name) < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.target_count is not None and cfg.target_count < 1:
        raise BadInput(f"--target-count must be >= 1, got {cfg.target_count}")
    if cfg.timesteps < 2 or cfg.sample_steps > cfg.timesteps:
        raise BadInput(f"need 2 <= --timesteps and --sample-steps <= --timesteps, got "
                       f"{cfg.timesteps} and {cfg.sample_steps}")
    if not 0 < cfg.beta_1 < cfg.beta_T < 1:
        raise BadInput(f"need 0 < --beta-1 < --beta-T < 1, got {cfg.beta_1}, {cfg.beta_T}")
    for name in ("tau", "gamma", "alpha", "guidance", "eta", "unet_dropout",
                 "weight_decay", "warmup_epochs", "workers"):
        if not getattr(cfg, name) >= 0:
            raise BadInput(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    for name, most in (("lr", lt_data.SGD_LR_MAX), ("diffusion_lr", lt_data.ADAM_LR_MAX)):
        if not 0 < getattr(cfg, name) <= most:
            raise BadInput(f"--{name.replace('_', '-')} must be > 0 and <= {most:.2g}, "
                           f"got {getattr(cfg, name)}")
    if cfg.unet_dropout >= 1 or cfg.eta > 1:
        raise BadInput(f"need --unet-dropout < 1 and --eta <= 1 (1 = DDPM-like sampling), got "
                       f"{cfg.unet_dropout} and {cfg.eta}")
    if not 0 <= cfg.label_dropout < 1 or not 0 <= cfg.ema_decay < 1 or not cfg.grad_clip > 0:
        raise BadInput("need 0 <= --label-dropout < 1, 0 <= --ema-decay < 1 and --grad-clip > 0")
    if not cfg.synthetic_weight > 0:
        raise BadInput(f"--synthetic-weight must be > 0, got {cfg.synthetic_weight}")
    if cfg.guidance > 0 and cfg.label_dropout == 0:
        raise BadInput("--guidance > 0 needs --label-dropout > 0 (the null label must be trained)")
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
# Generator: the class-conditional UNet of pytorch-ddpm / CBDM (Ho et al. 2020, App. B): residual
# blocks with a time + class embedding, self-attention at the listed resolutions, skip connections
# between mirrored levels. forward(x_t, t, y) -> predicted noise eps, same shape as x_t.


def cfg_unet(cfg):
    """The UNet keyword arguments from the config; BadInput if they do not describe a UNet."""
    try:
        mult = tuple(int(m) for m in cfg.unet_mult.split(","))
        attn = tuple(int(r) for r in cfg.unet_attn.split(",")) if cfg.unet_attn else ()
    except ValueError:
        raise BadInput(f"--unet-mult and --unet-attn take comma-separated integers, got "
                       f"{cfg.unet_mult!r} and {cfg.unet_attn!r}") from None
    if not mult or min(mult) < 1 or cfg.gen_size % 2 ** (len(mult) - 1):
        raise BadInput(f"--gen-size {cfg.gen_size} must be divisible by 2^(levels - 1) for "
                       f"--unet-mult {cfg.unet_mult}")
    return dict(image_size=cfg.gen_size, ch=cfg.unet_ch, ch_mult=mult,
                num_res_blocks=cfg.unet_blocks, attn_res=attn, dropout=cfg.unet_dropout)


def group_norm(c):
    # 32 groups as in pytorch-ddpm (all its layers have >= 128 channels); in the narrow digits /
    # smoke nets the largest power of two that divides c and leaves >= 4 channels a group (ours).
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if c % g == 0 and 4 * g <= max(4, c))
    return nn.GroupNorm(groups, c)


def timestep_embedding(t, dim):
    """Sinusoidal embedding of the step index t (B,) -> (B, dim) (Vaswani et al. 2017, as DDPM)."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, device=t.device) / dim)
    angles = t.float()[:, None] * freqs[None]  # (B, dim / 2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection. q, k, v and
    the output projection are 1x1 convolutions, as in pytorch-ddpm."""

    def __init__(self, c):
        super().__init__()
        self.norm, self.qkv, self.proj = group_norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        # A 1x1 convolution is a linear map of each position's channels, so it is applied as one to
        # the (B, 1 head, HW, C) rows: scaled_dot_product_attention takes its fused kernels only
        # for 4-D (batch, heads, length, dim) inputs.
        B, C, H, W = x.shape
        rows = self.norm(x).permute(0, 2, 3, 1).reshape(B, 1, H * W, C)
        q, k, v = F.linear(rows, self.qkv.weight.flatten(1), self.qkv.bias).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v)
        h = F.linear(h, self.proj.weight.flatten(1), self.proj.bias)
        return x + h.view(B, H, W, C).permute(0, 3, 1, 2)


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, emb_dim, dropout, attn):
        super().__init__()
        self.block1 = nn.Sequential(group_norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, 1, 1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, c_out))
        self.block2 = nn.Sequential(group_norm(c_out), nn.SiLU(), nn.Dropout(dropout),
                                    nn.Conv2d(c_out, c_out, 3, 1, 1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.attn = Attention(c_out) if attn else nn.Identity()
        nn.init.zeros_(self.block2[-1].weight)  # each block starts as the identity (pytorch-ddpm
        nn.init.zeros_(self.block2[-1].bias)    # uses a 1e-5 gain; zero is the same idea)

    def forward(self, x, emb):  # (B, c_in, H, W), (B, emb_dim) -> (B, c_out, H, W)
        h = self.block1(x) + self.emb(emb)[:, :, None, None]
        return self.attn(self.block2(h) + self.skip(x))


class UNet(nn.Module):
    """Class-conditional epsilon-prediction UNet. Label `num_classes` is the learned null class
    used for classifier-free guidance (Ho & Salimans 2022). With the CIFAR configuration (ch 128,
    ch_mult 1,2,2,2, 2 blocks, attention at 16x16) it has ~35.7 M parameters, as pytorch-ddpm."""

    def __init__(self, num_classes, in_channels, image_size, ch, ch_mult, num_res_blocks,
                 attn_res, dropout):
        super().__init__()
        self.ch, emb_dim = ch, 4 * ch
        self.time = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label = nn.Embedding(num_classes + 1, emb_dim)
        self.head = nn.Conv2d(in_channels, ch, 3, 1, 1)
        self.down, skips, c, res = nn.ModuleList(), [ch], ch, image_size
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(c, ch * mult, emb_dim, dropout, res in attn_res))
                c = ch * mult
                skips.append(c)
            if level < len(ch_mult) - 1:
                self.down.append(nn.Conv2d(c, c, 3, 2, 1))  # halve H and W
                skips.append(c)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, dropout, True),
                                  ResBlock(c, c, emb_dim, dropout, False)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(skips.pop() + c, ch * mult, emb_dim, dropout,
                                        res in attn_res))
                c = ch * mult
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(c, c, 3, 1, 1)))
                res *= 2
        self.tail = nn.Sequential(group_norm(c), nn.SiLU(), nn.Conv2d(c, in_channels, 3, 1, 1))
        nn.init.zeros_(self.tail[-1].weight)
        nn.init.zeros_(self.tail[-1].bias)

    def forward(self, x, t, y):  # (B, C, H, W), (B,) step indices, (B,) labels -> (B, C, H, W)
        emb = self.time(timestep_embedding(t, self.ch)) + self.label(y)
        h = self.head(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], 1), emb) if isinstance(layer, ResBlock) else layer(h)
        return self.tail(h)


# -------------------------------------------------------------------------------------------------
# Diffusion math (Ho et al. 2020 = DDPM; Song et al. 2021 = DDIM). Step indices t are 0-based:
# index t stands for the paper's step t + 1, so abar[t] = prod_{s <= t} (1 - betas[s]) and
# abar[-1] ("before step 0") is 1. Schedules are float64 tensors on the CPU; `_at` gathers the
# values for a batch of indices and moves them to the data's device and dtype.


def linear_schedule(T=1000, beta_1=1e-4, beta_T=0.02):
    """DDPM Sec. 4: betas linear from beta_1 to beta_T over T steps. Returns (betas, alphas_bar),
    float64, checked here: 0 < beta < 1 and alphas_bar strictly decreasing in (0, 1)."""
    betas = torch.linspace(beta_1, beta_T, T, dtype=torch.float64)
    abar = torch.cumprod(1.0 - betas, dim=0)
    if not (((betas > 0) & (betas < 1)).all() and (abar[1:] < abar[:-1]).all() and abar[-1] > 0):
        raise BadInput(f"bad schedule: need 0 < beta_1 < beta_T < 1, got {beta_1}, {beta_T}")
    return betas, abar


def _at(values, t, x):
    """values[t] shaped (B, 1, 1, 1) for broadcasting against x. t: int or (B,) CPU tensor."""
    v = values[t] if torch.is_tensor(t) else values[t].expand(x.shape[0])
    return v.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))


def q_sample(x0, t, noise, abar):
    """DDPM Eq. 4 in closed form: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, eps ~ N(0, I)."""
    return _at(abar.sqrt(), t, x0) * x0 + _at((1 - abar).sqrt(), t, x0) * noise


def predict_x0(x_t, t, eps, abar):
    """Invert Eq. 4 for the clean image: x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    return (x_t - _at((1 - abar).sqrt(), t, x_t) * eps) / _at(abar.sqrt(), t, x_t)


def predict_eps(x_t, t, x0, abar):
    """Invert Eq. 4 for the noise: eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""
    return (x_t - _at(abar.sqrt(), t, x_t) * x0) / _at((1 - abar).sqrt(), t, x_t)


def posterior(x0, x_t, t, betas, abar):
    """DDPM Eqs. 6-7: q(x_{t-1} | x_t, x0) = N(mean, beta_tilde_t), with
        mean = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0
               + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t,
        beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t.
    Returns (mean, variance shaped (B, 1, 1, 1))."""
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    c0 = abar_prev.sqrt() * betas / (1 - abar)
    ct = (1 - betas).sqrt() * (1 - abar_prev) / (1 - abar)
    var = (1 - abar_prev) / (1 - abar) * betas
    return _at(c0, t, x_t) * x0 + _at(ct, t, x_t) * x_t, _at(var, t, x_t)


def ddpm_step(x_t, t, eps, betas, abar, noise, variance="beta"):
    """DDPM Algorithm 2, one step t -> t-1 (t an int): x0_hat from eps, clipped to [-1, 1] as in
    Ho et al.'s code; mean of the posterior at x0_hat; variance sigma_t^2 = beta_t (pytorch-ddpm's
    'fixedlarge', its CIFAR default) or beta_tilde_t ('posterior'). No noise is added at the last
    step, so the variance there does not matter."""
    x0 = predict_x0(x_t, t, eps, abar).clamp(-1, 1)
    mean, var = posterior(x0, x_t, t, betas, abar)
    if t == 0:
        return mean
    if variance == "beta":
        var = _at(betas, t, x_t)
    return mean + var.sqrt() * noise


def ddim_step(x_t, t, t_prev, eps, abar, eta=0.0, noise=None):
    """DDIM Eq. 12, one step t -> t_prev (t_prev = -1 means 'to x0'): x0_hat from eps (clipped to
    [-1, 1] and eps re-derived from it, as guided-diffusion does), then
    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma z, with
    sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev). eta = 0 is
    deterministic."""
    x0 = predict_x0(x_t, t, eps, abar).clamp(-1, 1)
    eps = predict_eps(x_t, t, x0, abar)
    a_t = abar[t]
    a_prev = abar[t_prev] if t_prev >= 0 else abar.new_ones(())
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    out = a_prev.sqrt().item() * x0 + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt().item() * eps
    return out + sigma.item() * noise if eta > 0 else out


def guided_eps(model, x_t, t, y, w, null_label):
    """Classifier-free guidance (Ho & Salimans 2022) in CBDM's convention:
    eps = eps(x_t, y) + w (eps(x_t, y) - eps(x_t, null)) = (1 + w) eps(y) - w eps(null), so w = 0 is
    the plain conditional model and CBDM's w = 1.6 weighs the conditional prediction by 2.6.
    Both predictions come from one batched forward pass."""
    tt = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
    if w == 0:
        return model(x_t, tt, y)
    eps_c, eps_u = model(torch.cat([x_t, x_t]), torch.cat([tt, tt]),
                         torch.cat([y, torch.full_like(y, null_label)])).chunk(2)
    return (1 + w) * eps_c - w * eps_u


@torch.no_grad()
def sample(model, labels, betas, abar, generator, sampler="ddim", steps=50, w=1.6, eta=0.0,
           null_label=None, channels=1, size=8, bf16=False):
    """Draw one image per label, returned in [-1, 1]. x_T and every injected noise come from the
    CPU `generator`, so a shard is a pure function of its generator seed. ddpm: all T ancestral
    steps (DDPM Algorithm 2); ddim: `steps` evenly spaced steps (DDIM Sec. 4.2). bf16: the model
    runs in bf16 autocast; the update steps stay in fp32."""
    device = labels.device

    def randn():
        return torch.randn(len(labels), channels, size, size, generator=generator).to(device)

    def eps(x, t):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return guided_eps(model, x, t, labels, w, null_label).float()

    x = randn()  # x_T ~ N(0, I)
    T = len(betas)
    if sampler == "ddpm":
        for t in range(T - 1, -1, -1):
            x = ddpm_step(x, t, eps(x, t), betas, abar, randn() if t > 0 else None)
        return x
    ts = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long().tolist()
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        x = ddim_step(x, t, t_prev, eps(x, t), abar, eta, randn() if eta > 0 else None)
    return x


# -------------------------------------------------------------------------------------------------
# Losses: the CBDM regulariser, DiffuLT's AID-biased loss (our reading), the ID / AID / OOD rule,
# and the class prior of the DiffuLT classifier's data. DiffuLT's weighted CE is the shared
# core's weighted_ce (used by train_classifier below).


def cbdm_loss(eps_y, eps_yp, t, T, tau=1.0, gamma=0.25):
    """CBDM regulariser (Qin et al. 2023, the official code's form), per sample (B,):
        tau * (t / T) * ( ||eps(x_t, y) - sg(eps(x_t, y'))||^2
                          + gamma * ||sg(eps(x_t, y)) - eps(x_t, y')||^2 )
    with sg = stop-gradient and ||.||^2 the mean over pixels (as CBDM's F.mse_loss). The first term
    pulls the conditional prediction towards the prediction for a class-balanced label y'; the
    second (commitment) term moves the y' prediction back by a quarter of the force. t are 0-based
    indices; t / T uses the paper's step t + 1 (CBDM's code uses t; the difference is <= 1 / T)."""
    reg = (eps_y - eps_yp.detach()).square().flatten(1).mean(1)
    com = (eps_y.detach() - eps_yp).square().flatten(1).mean(1)
    weight = tau * (t.to(eps_y.device, eps_y.dtype) + 1) / T
    return weight * (reg + gamma * com)


def band(distance, radius):
    """DiffuLT's groups by the phi-distance d to the class centre and the class radius d_f:
    0 = ID (d <= d_f), 1 = AID (d_f < d <= 2 d_f), 2 = OOD (d > 2 d_f)."""
    return (distance > radius).long() + (distance > 2 * radius).long()


def aid_loss(feats, centres, radii, abar_t):
    """AID-biased loss, per sample (B,). THE FORMULA IS OURS: DiffuLT says phi is used during
    diffusion training to favour AID samples by penalising ID and OOD ones, but its equation is
    not available to us. Our reading: with feats = phi(x0_hat) of the model's clean-image estimate
    x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t), r = ||feats - c_y|| / d_f(y) and
        L_AID = abar_t * ( relu(1 - r) + relu(r - 2) ),
    zero inside the AID band 1 <= r <= 2 and growing linearly outside it; abar_t down-weights high
    noise levels, where x0_hat is a blur and its distance means little."""
    r = (feats - centres).norm(dim=1) / radii
    return abar_t * (F.relu(1 - r) + F.relu(r - 2))


def training_prior(real_counts, kept_counts, omega):
    """Class prior of the data the DiffuLT classifier was trained on, for DiffuLT+LA: each
    synthetic sample counts at its CE weight omega, so n_c = real_c + omega * kept_c."""
    return [r + omega * k for r, k in zip(real_counts, kept_counts)]


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
# Several processes and the speed switches. `torchrun --nproc_per_node N diffult.py ...` starts N
# processes (ranks), one per device. The training stages run on every rank under
# DistributedDataParallel (DDP): every rank draws the same global batch from the same seeded
# generators and computes the loss of its own rows of it; DDP averages the gradients. Rank 0 alone
# writes the files every rank shares. A plain `python diffult.py` is one rank, and all of this then
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
        # Long timeout: the other ranks wait at a barrier while rank 0 alone filters the generated
        # images, which on ImageNet-LT (~1.2 M images) can outlast the default 10 minutes of NCCL.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=2))
    if min(cfg.batch_size, cfg.diffusion_batch) < world_size():
        raise BadInput(f"--batch-size and --diffusion-batch must be at least the number of "
                       f"processes, {world_size()}")
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
        log(f"{desc}: resuming after {start} of {cfg.epochs} epochs")
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
# Stages: <out>/<stage>/ holds a stage's files; <out>/<stage>/done.json marks it finished.

STAGES = ["baseline", "diffusion", "generate", "filter", "classifier", "evaluate"]


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


# -------------------------------------------------------------------------------------------------
# DiffuLT stages. Each returns the summary that goes into its done.json.


def log(message):  # one line per stage event, never inside a loop; rank 0 speaks for all
    if is_main():
        print(f"[diffult] {message}", file=sys.stderr, flush=True)


def rng_seed(cfg, purpose, i=0):
    """A seed derived from (--seed, purpose, i): every random draw of a loop comes from a generator
    seeded with the step / shard it belongs to, so a resumed run repeats an uninterrupted one."""
    return zlib.crc32(f"{cfg.seed}:{purpose}:{i}".encode())


def to_unit(x):
    """uint8 [0, 255] -> float [-1, 1], the range the diffusion model works in."""
    return x.float() / 127.5 - 1.0


def to_uint8(x):
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def resize(x, size):
    """Bilinear (antialiased when shrinking) resize of float (B, C, H, W); a no-op at equal size.
    Only imagenet_lt generates at a size other than the classifier's input."""
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=x.shape[-1] > size)


def phi_input(x, data, cfg):
    """Images in [-1, 1] at the generator's size -> the classifier's normalised input.
    Differentiable, so L_AID's gradient flows through it; normalise() does the same on uint8."""
    mean = torch.tensor(data.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=x.device).view(1, -1, 1, 1)
    return (resize((x + 1) / 2, cfg.image_size) - mean) / std


@torch.no_grad()
def phi_features(phi, images, data, cfg, device, batch_size=512):
    """phi-features (N, D) of generated uint8 images (N, C, gen, gen)."""
    feats = [phi.features(phi_input(to_unit(x.to(device)), data, cfg)).float().cpu()
             for x in images.split(batch_size)]
    return torch.cat(feats) if feats else torch.zeros(0, phi.fc.in_features)


def load_classifier(cfg, data, stage, device):
    """The classifier trained by `stage` (its last per-epoch checkpoint), frozen, in eval mode."""
    model = make_classifier(cfg.arch, data.num_classes, data.channels)
    lt_data.load_checkpoint(os.path.join(cfg.out, stage, "ckpt.pt"), keys=("epoch",),
                            into={"model": model})
    return place(model, cfg, device).eval().requires_grad_(False)


def make_unet(cfg, data):
    return UNet(data.num_classes, data.channels, **cfg_unet(cfg))


def stage_baseline(cfg, data, device):
    """Stage 1: CE classifier = the CE row and phi. Class centres c_y and radii d_f(y) of the real,
    un-augmented training features."""
    folder = stage_dir(cfg, "baseline")
    # Stage-1 init from torch.manual_seed(seed), as ldmlr.py's encoder stage: with the same seed
    # both scripts train the same CE model, so their CE rows are one shared baseline.
    torch.manual_seed(cfg.seed)
    model = make_classifier(cfg.arch, data.num_classes, data.channels)
    train_classifier(model, data.train, data, cfg, device, os.path.join(folder, "ckpt.pt"),
                     desc="baseline CE")
    if not is_main():  # the statistics take one pass over the data: rank 0 alone computes them
        return None
    _, feats = predict(model, data.train, data, device, workers=cfg.workers)
    labels = data.train.labels
    centres = torch.stack([feats[labels == c].mean(0) for c in range(data.num_classes)])
    # d_f(y) = the radius of the real class cloud, max over real images of class y of their
    # distance to c_y. OURS: the paper's wording of d_f is not available to us (one secondary
    # source reads it as the max distance between two real samples, about twice this).
    dist = (feats - centres[labels]).norm(dim=1)
    radii = torch.stack([dist[labels == c].max() for c in range(data.num_classes)])
    # A one-image class has radius 0; give it the mean radius of the others (ours), so that
    # distances can still be measured in units of d_f.
    radii = torch.where(radii > 0, radii, radii[radii > 0].mean())
    lt_data.atomic_save({"centres": centres, "radii": radii, "feats": feats, "labels": labels},
                        os.path.join(folder, "stats.pt"))
    return {"mean_radius": radii.mean().item()}


def step_indices(cfg, n, step):
    """The training images of diffusion step `step`: drawn with replacement, from a generator
    seeded by (seed, step) (pytorch-ddpm loops over shuffled epochs; i.i.d. draws are ours)."""
    gen = torch.Generator().manual_seed(rng_seed(cfg, "diffusion-batch", step))
    return torch.randint(n, (cfg.diffusion_batch,), generator=gen)


class StepIndices(torch.utils.data.Sampler):
    """step_indices for steps start..end-1 as a DataLoader batch sampler (datasets on disk): this
    rank's rows of each."""

    def __init__(self, cfg, n, start, end):
        self.cfg, self.n, self.start, self.end = cfg, n, start, end

    def __iter__(self):
        rows = my_rows(self.cfg.diffusion_batch)
        return (step_indices(self.cfg, self.n, s)[rows].tolist()
                for s in range(self.start, self.end))

    def __len__(self):
        return self.end - self.start


def stage_diffusion(cfg, data, device):
    """Stage 2: the class-conditional DDPM with the CBDM regulariser and L_AID (see train loop)."""
    folder = stage_dir(cfg, "diffusion")
    ckpt_path = os.path.join(folder, "ckpt.pt")
    betas, abar = linear_schedule(cfg.timesteps, cfg.beta_1, cfg.beta_T)
    T, C, null = cfg.timesteps, data.num_classes, data.num_classes
    torch.manual_seed(rng_seed(cfg, "diffusion-init"))
    model = place(make_unet(cfg, data), cfg, device)
    ema = place(make_unet(cfg, data), cfg, device).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt_ = torch.optim.Adam(model.parameters(), lr=cfg.diffusion_lr)
    # phi: frozen (eval mode: BatchNorm uses its running statistics; no parameter gradients), but
    # differentiable with respect to its input, so L_AID trains the denoiser through it.
    phi = load_classifier(cfg, data, "baseline", device) if cfg.alpha > 0 else None
    start = 0
    if os.path.isfile(ckpt_path):  # every rank; after every model is built (init draws the RNG)
        ckpt = lt_data.load_checkpoint(ckpt_path, keys=("rng", "step"),
                                       into={"model": model, "ema": ema, "optimizer": opt_})
        torch.set_rng_state(ckpt["rng"])  # the global CPU RNG drives dropout on CPU only
        start = ckpt["step"]
        log(f"diffusion: resuming at step {start}")
    stats = lt_data.load_checkpoint(os.path.join(cfg.out, "baseline", "stats.pt"),
                                    keys=("centres", "radii"))
    centres, radii = stats["centres"].to(device), stats["radii"].to(device)
    counts = torch.tensor(data.train_counts, dtype=torch.float64)
    # CBDM's target label y': uniform over classes (the paper's balanced target), or the training
    # label frequencies (`--cbdm-prior empirical`, what the official code draws).
    prior = torch.ones(C, dtype=torch.float64) if cfg.cbdm_prior == "uniform" else counts
    flip = data.name != "digits"  # random horizontal flip, as pytorch-ddpm; mirrored digits are not
    # Each step's global batch of B images; this rank reads and trains on its rows of it.
    B, rows = cfg.diffusion_batch, my_rows(cfg.diffusion_batch)
    if hasattr(data.train, "images"):  # in memory: on the device once, not step by step
        images, labels = data.train.images.to(device), data.train.labels.to(device)
        source = ((images[i], labels[i])
                  for i in (step_indices(cfg, len(data.train), s)[rows]
                            for s in range(start, cfg.diffusion_steps)))
    else:
        source = torch.utils.data.DataLoader(
            data.train, batch_sampler=StepIndices(cfg, len(data.train), start,
                                                  cfg.diffusion_steps), num_workers=cfg.workers)
    n_params = sum(p.numel() for p in model.parameters())
    bar = tqdm(range(start, cfg.diffusion_steps), desc=f"diffusion ({n_params / 1e6:.2f} M)",
               initial=start, total=cfg.diffusion_steps, unit="step", disable=not is_main())
    total, since, t0, log_every = torch.zeros((), device=device), 0, time.time(), 50
    last_loss = None
    # Test hook: exit abruptly (like kill -9) right after the checkpoint of this step, so the test
    # suite can check that a rerun resumes from it and ends where an uninterrupted run ends.
    exit_at = int(os.environ.get("DIFFULT_EXIT_AFTER_STEP", "0"))
    net, bf16 = for_training(model, cfg, device), use_bf16(cfg, device)
    model.train()
    for step, (x, y) in zip(bar, source):
        gen = torch.Generator().manual_seed(rng_seed(cfg, "diffusion-step", step))
        # Every draw is made for the whole global batch and this rank keeps its rows: the ranks'
        # generators stay in step, and each image gets the draws it gets in one process.
        x0 = to_unit(resize(x.to(device).float(), cfg.gen_size))  # (b, C, gen, gen) in [-1, 1]
        if flip:
            flips = (torch.rand(B, generator=gen)[rows] < 0.5).to(device).view(-1, 1, 1, 1)
            x0 = torch.where(flips, x0.flip(3), x0)
        t = torch.randint(T, (B,), generator=gen)[rows]  # 0-based step indices, uniform over T
        noise = torch.randn((B, *x0.shape[1:]), generator=gen)[rows].to(device)
        dropped = (torch.rand(B, generator=gen) < cfg.label_dropout)[rows]
        y_bal = torch.multinomial(prior, B, replacement=True, generator=gen)[rows].to(device)
        y, td = y.to(device), t.to(device)
        y_in = torch.where(dropped.to(device), torch.full_like(y, null), y)
        for g in opt_.param_groups:  # linear warm-up, then constant (pytorch-ddpm / CBDM)
            g["lr"] = cfg.diffusion_lr * min(1.0, (step + 1) / cfg.diffusion_warmup)
        if device.type != "cpu" or world_size() > 1:
            # Dropout draws from the device's global generator. In one CPU process that is the
            # CPU RNG, which the checkpoint keeps; a GPU's generator is not kept, and under DDP
            # each rank needs a stream of its own. So here it is seeded from (seed, rank, step)
            # at every step, and a resumed run still repeats an uninterrupted one.
            torch.manual_seed(rng_seed(cfg, f"dropout-rank{rank()}", step))

        x_t = q_sample(x0, t, noise, abar)
        with autocast(device, bf16):  # model outputs back to fp32: the losses are computed in fp32
            eps = net(x_t, td, y_in).float()
            loss = (eps - noise).square().flatten(1).mean(1)  # DDPM's L_simple, per sample (b,)
            # CBDM and L_AID act on the samples that kept their label (ours: CBDM's code drops the
            # label of a whole batch at once and then skips its regulariser for that batch).
            kept = (~dropped).to(device, x0.dtype)
            if cfg.tau > 0:
                eps_bal = net(x_t, td, y_bal).float()
                loss = loss + kept * cbdm_loss(eps, eps_bal, t, T, cfg.tau, cfg.gamma)
            if cfg.alpha > 0:
                feats = phi.features(phi_input(predict_x0(x_t, t, eps, abar), data, cfg)).float()
                loss = loss + cfg.alpha * kept * aid_loss(feats, centres[y], radii[y],
                                                          _at(abar, t, x0).view(-1))
        loss = global_mean(loss, B)
        opt_.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt_.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - cfg.ema_decay)
        total += loss.detach()
        since += 1
        done = step + 1
        if done % log_every == 0 or done % cfg.ckpt_every == 0 or done == cfg.diffusion_steps:
            last_loss = synced_mean(total, since)  # the only host-device sync: once per interval
            if not math.isfinite(last_loss):
                raise FloatingPointError(f"diffusion: loss became {last_loss} before step {done};"
                                         f" the last good checkpoint is kept at {ckpt_path}")
            bar.set_postfix(loss=f"{last_loss:.4f}",
                            img_s=f"{since * B / (time.time() - t0):.0f}")
            total.zero_()
            since, t0 = 0, time.time()
        if done % cfg.ckpt_every == 0 or done == cfg.diffusion_steps:
            if not all_finite(model, ema):
                raise FloatingPointError(f"diffusion: the weights became non-finite by step "
                                         f"{done}; the last good checkpoint is kept at {ckpt_path}")
            if is_main():
                lt_data.atomic_save({"model": model.state_dict(), "ema": ema.state_dict(),
                                     "optimizer": opt_.state_dict(), "step": done,
                                     "rng": torch.get_rng_state(),
                                     "config": dataclasses.asdict(cfg)}, ckpt_path)
            if done == exit_at:
                barrier()  # every rank exits after rank 0 has saved
                os._exit(137)
    return {"steps": cfg.diffusion_steps, "parameters": n_params, "final_loss": last_loss}


def generation_plan(counts, target, shard_size):
    """Labels to generate, class by class: target - n_c for every class below the target, cut
    into shards of `shard_size` (the unit that is saved, and resumed from)."""
    labels = torch.cat([torch.full((max(0, target - n),), c, dtype=torch.long)
                        for c, n in enumerate(counts)])
    return list(labels.split(shard_size))


def stage_generate(cfg, data, device):
    """Stage 3: top every class up to N_t with the EMA denoiser, shard by shard. A shard is saved
    atomically as uint8 and is a pure function of (seed, shard index), so a rerun after an
    interruption generates only the missing shards and ends with the same images."""
    folder = stage_dir(cfg, "generate")
    betas, abar = linear_schedule(cfg.timesteps, cfg.beta_1, cfg.beta_T)
    ema = make_unet(cfg, data)
    lt_data.load_checkpoint(os.path.join(cfg.out, "diffusion", "ckpt.pt"), keys=("step",),
                            into={"ema": ema})
    place(ema, cfg, device).eval()
    target = cfg.target_count or data.n_max
    plan = generation_plan(data.train_counts, target, cfg.gen_batch)
    saved = [os.path.isfile(os.path.join(folder, f"shard_{i:05d}.pt")) for i in range(len(plan))]
    if any(saved):
        log(f"generate: {sum(saved)} of {len(plan)} shards already saved, resuming")
    # Shard i is generated by rank i % world size, and only that rank writes its file.
    mine = range(rank(), len(plan), world_size())
    todo = [i for i in mine if not saved[i]]
    # Test hook: exit abruptly (like kill -9) after this many new shards, so the test suite can
    # check that a rerun resumes from the saved shards.
    exit_after = int(os.environ.get("DIFFULT_EXIT_AFTER_SHARDS", "0"))
    steps = cfg.timesteps if cfg.sampler == "ddpm" else cfg.sample_steps
    n_images, n_mine = sum(len(p) for p in plan), sum(len(plan[i]) for i in mine)
    bar = tqdm(total=n_mine, initial=n_mine - sum(len(plan[i]) for i in todo),
               desc=f"generate ({cfg.sampler}, {steps} steps)", unit="img", disable=not is_main())
    bf16 = use_bf16(cfg, device)
    for n_new, i in enumerate(todo, 1):
        labels = plan[i]
        gen = torch.Generator().manual_seed(rng_seed(cfg, "generate-shard", i))
        x = sample(ema, labels.to(device), betas, abar, gen, cfg.sampler, cfg.sample_steps,
                   cfg.guidance, cfg.eta, null_label=data.num_classes, channels=data.channels,
                   size=cfg.gen_size, bf16=bf16)
        lt_data.atomic_save({"images": to_uint8(x).cpu(), "labels": labels},
                            os.path.join(folder, f"shard_{i:05d}.pt"))
        bar.update(len(labels))
        if n_new == exit_after:
            os._exit(137)
    bar.close()
    return {"target_count": target, "shards": len(plan), "images": n_images,
            "sampler": cfg.sampler, "steps": steps}


def load_generated(cfg, data):
    """All generated images and labels, shard by shard in plan order. Each shard is checked
    against the generation plan: a shard of another image shape or dtype, or with other labels (a
    file from another run, say), is BadInput here instead of a crash or a silent mix later on."""
    C, S = data.channels, cfg.gen_size
    plan = generation_plan(data.train_counts, cfg.target_count or data.n_max, cfg.gen_batch)
    images, labels = [], []
    for i, planned in enumerate(plan):
        path = os.path.join(cfg.out, "generate", f"shard_{i:05d}.pt")
        shard = lt_data.load_checkpoint(path, keys=("images", "labels"))
        x, y = shard["images"], shard["labels"]
        expected = (len(planned), C, S, S)
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and tuple(x.shape) == expected):
            problem = (f"images {getattr(x, 'dtype', type(x).__name__)} "
                       f"{tuple(getattr(x, 'shape', ()))}, this run generates uint8 {expected}")
        elif not (torch.is_tensor(y) and y.dtype == torch.long and y.shape == planned.shape):
            problem = f"labels that are not {len(planned)} int64 class indices"
        elif ((y < 0) | (y >= data.num_classes)).any():
            problem = f"labels outside 0..{data.num_classes - 1}"
        elif not torch.equal(y, planned):
            problem = "other labels than this run's generation plan"
        else:
            images.append(x)
            labels.append(y)
            continue
        raise BadInput(f"{path} holds {problem}; rerun with --redo generate")
    if not images:
        return torch.zeros(0, C, S, S, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
    return torch.cat(images), torch.cat(labels)


def frechet_or_none(a, b):
    """In-domain Frechet distance between two phi-feature sets, or None when either set has no more
    samples than the feature dimension: with n <= D the covariance is singular and the number is
    dominated by which directions happen to be sampled (our rule)."""
    if min(len(a), len(b)) <= a.shape[1]:
        return None
    return lt_data.frechet_distance(a, b)


def save_samples_png(images, groups, path, per_row=10):
    """samples.png: one row each of ID, AID and OOD samples (blank where a group has fewer),
    spread over the group so that several classes show; small images are upscaled for viewing."""
    from PIL import Image
    C, H, W = images.shape[1:]
    zoom, pad = max(1, 32 // W), 2
    h, w = H * zoom, W * zoom
    grid = torch.full((C, pad + 3 * (h + pad), pad + per_row * (w + pad)), 128, dtype=torch.uint8)
    for g in range(3):
        members = torch.nonzero(groups == g).flatten()
        pick = members[torch.linspace(0, len(members) - 1, min(per_row, len(members))).long()] \
            if len(members) else members
        for j, i in enumerate(pick.tolist()):
            top, left = pad + g * (h + pad), pad + j * (w + pad)
            grid[:, top:top + h, left:left + w] = \
                images[i].repeat_interleave(zoom, 1).repeat_interleave(zoom, 2)
    pixels = grid[0].numpy() if C == 1 else grid.permute(1, 2, 0).numpy()
    lt_data.atomic_write(path, lambda f: Image.fromarray(pixels).save(f, format="PNG"))


def stage_filter(cfg, data, device):
    """Stage 4: ID / AID / OOD by phi-distance to the class centre (band()); OOD dropped unless
    --no-filter. Fractions, kept counts, distances and Frechet distances go to "generated"."""
    folder = stage_dir(cfg, "filter")
    images, labels = load_generated(cfg, data)
    phi = load_classifier(cfg, data, "baseline", device)
    stats = lt_data.load_checkpoint(os.path.join(cfg.out, "baseline", "stats.pt"),
                                    keys=("centres", "radii", "feats", "labels"))
    feats = phi_features(phi, images, data, cfg, device)
    dist = (feats - stats["centres"][labels]).norm(dim=1)
    groups = band(dist, stats["radii"][labels])
    keep = torch.ones_like(groups, dtype=torch.bool) if cfg.no_filter else groups < 2
    lt_data.atomic_save({"images": images[keep], "labels": labels[keep]},
                        os.path.join(folder, "kept.pt"))
    save_samples_png(images, groups, os.path.join(cfg.out, "samples.png"))

    C, names = data.num_classes, ("id", "aid", "ood")
    per_class = torch.bincount(labels, minlength=C)
    frac = {}
    for g, name in enumerate(names):
        in_g = groups == g
        frac[name] = in_g.double().mean().item() if len(groups) else None
        n_g = torch.bincount(labels[in_g], minlength=C)
        frac[f"{name}_per_class"] = [n / m if m else None for n, m in
                                     zip(n_g.tolist(), per_class.tolist())]
    real_f, real_y = stats["feats"], stats["labels"]
    return {
        "counts": per_class.tolist(),  # generated images per class
        "target_count": cfg.target_count or data.n_max,
        "fractions": frac,
        "kept": int(keep.sum()),
        "kept_per_class": torch.bincount(labels[keep], minlength=C).tolist(),
        "filtered": not cfg.no_filter,
        "mean_distance": {n: (dist[groups == g].mean().item() if (groups == g).any() else None)
                          for g, n in enumerate(names)},
        "mean_distance_over_radius": {
            n: ((dist / stats["radii"][labels])[groups == g].mean().item()
                if (groups == g).any() else None) for g, n in enumerate(names)},
        "frechet": {
            "overall": frechet_or_none(real_f, feats),
            "per_class": [frechet_or_none(real_f[real_y == c], feats[labels == c])
                          for c in range(C)],
            **{n: frechet_or_none(real_f, feats[groups == g]) for g, n in enumerate(names)},
        },
    }


class Upsampled(torch.utils.data.Dataset):
    """Generated uint8 images resized to the classifier's input (imagenet_lt generates at 64)."""

    def __init__(self, images, labels, size):
        self.images, self.labels, self.size = images, labels, size

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = resize(self.images[i:i + 1].float(), self.size).round().clamp(0, 255)
        return x[0].to(torch.uint8), self.labels[i]


def stage_classifier(cfg, data, device):
    """Stage 5: a fresh classifier on real + kept synthetic images, the stage-1 recipe with
    weighted CE: w = 1 for real and omega for synthetic samples (weighted_ce)."""
    folder = stage_dir(cfg, "classifier")
    kept = lt_data.load_checkpoint(os.path.join(cfg.out, "filter", "kept.pt"),
                                   keys=("images", "labels"))
    real = data.train
    if hasattr(real, "images") and cfg.gen_size == cfg.image_size:
        dataset = lt_data.TensorImages(torch.cat([real.images, kept["images"]]),
                                       torch.cat([real.labels, kept["labels"]]))
    else:
        dataset = torch.utils.data.ConcatDataset(
            [real, Upsampled(kept["images"], kept["labels"], cfg.image_size)])
    weights = torch.cat([torch.ones(len(real)),
                         torch.full((len(kept["labels"]),), cfg.synthetic_weight)])
    torch.manual_seed(rng_seed(cfg, "classifier-init"))
    model = make_classifier(cfg.arch, data.num_classes, data.channels)
    train_classifier(model, dataset, data, cfg, device, os.path.join(folder, "ckpt.pt"),
                     weights=weights, desc="DiffuLT classifier")
    return {"real": len(real), "synthetic": len(kept["labels"]),
            "synthetic_weight": cfg.synthetic_weight}


def stage_evaluate(cfg, data, device):
    """Stage 6: CE, LA (post-hoc logit adjustment, tau = 1, real prior) on the stage-1 model;
    DiffuLT and DiffuLT+LA (prior of the data it was trained on) on the stage-5 model."""
    split = data.val if cfg.eval_split == "val" else data.test
    kept = read_done(cfg, "filter")["kept_per_class"]
    rows = {}
    for stage, name, la_name, prior in (
            ("baseline", "CE", "LA", data.train_counts),
            ("classifier", "DiffuLT", "DiffuLT+LA",
             training_prior(data.train_counts, kept, cfg.synthetic_weight))):
        logits, _ = predict(load_classifier(cfg, data, stage, device), split, data, device,
                            workers=cfg.workers)
        for row, scores in ((name, logits), (la_name, lt_data.logit_adjust(logits, prior, 1.0))):
            rows[row] = lt_data.accuracy_report(scores.argmax(1), split.labels, data.train_counts)
    return {"rows": {k: rows[k] for k in ("CE", "LA", "DiffuLT", "DiffuLT+LA")}}


def run(cfg):
    """The whole pipeline: every stage that is not done yet, then results.json and the table.
    Under torchrun every rank runs this; rank 0 alone writes the shared files."""
    lt_data.seed_everything(cfg.seed)
    device = dist_setup(cfg)
    load = (cfg.dataset, cfg.data_root, cfg.imb, cfg.seed)
    if cfg.download and world_size() > 1:  # one download, by rank 0, before any rank reads it
        on_main(lambda: lt_data.load_dataset(*load, True, image_size=cfg.image_size))
    data = agree(lt_data.load_dataset, *load, cfg.download, image_size=cfg.image_size)
    if cfg.eval_split == "val" and data.val is None:
        raise BadInput(f"{cfg.dataset} has no validation split here; use --eval-split test")
    config = dataclasses.asdict(cfg)
    may_change = [f for s in STAGES[STAGES.index(cfg.redo):] for f in REDO_FIELDS.get(s, ())] \
        if cfg.redo else []

    def prepare():  # rank 0 alone: the others would race it for config.json and the --redo
        lt_data.check_run_dir(cfg.out, config, ignore=NOT_RESULTS, may_change=may_change)
        if cfg.redo:
            redo_from(cfg, cfg.redo)
            lt_data.atomic_json(config, os.path.join(cfg.out, "config.json"))  # describes all now
        return [is_done(cfg, name) for name in STAGES]

    done = from_main(on_main(prepare))  # every rank skips the stages rank 0 found done
    stages = (stage_baseline, stage_diffusion, stage_generate, stage_filter, stage_classifier,
              stage_evaluate)
    # filter and evaluate make one pass over the generated or test images, cheap next to the
    # training stages: rank 0 does them alone while the others wait.
    alone = ("filter", "evaluate")
    for name, fn, finished in zip(STAGES, stages, done):
        if finished:
            log(f"{name}: done, skipped")
            continue
        t0 = time.time()
        info = on_main(fn, cfg, data, device) if name in alone else fn(cfg, data, device)
        barrier()  # the stage is done when every rank is: e.g. each has saved its shards
        if is_main():
            # Seconds of the process that finished the stage (a resumed stage counts its last
            # part).
            mark_done(cfg, name, {**info, "seconds": time.time() - t0})
        log(f"{name}: done in {time.time() - t0:.1f} s")
    if not is_main():
        return None
    results = {
        "method": "diffult", "dataset": cfg.dataset, "imb": cfg.imb, "seed": cfg.seed,
        "train_counts": data.train_counts,
        "rows": read_done(cfg, "evaluate")["rows"],
        "generated": {k: v for k, v in read_done(cfg, "filter").items() if k != "seconds"},
        "timing_s": {s: read_done(cfg, s)["seconds"] for s in STAGES},
        "config": dataclasses.asdict(cfg),
    }
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
