"""LDMLR: latent (feature-space) diffusion for long-tailed recognition, in one file.

P. Han et al., "Latent-based Diffusion Model for Long-tailed Recognition", CVPR 2024 workshops
(arXiv 2404.04517; official code AlvinHan123/LDMLR). A class-conditional DDPM (Ho et al. 2020)
learns the penultimate features of a CE classifier; DDIM (Song et al. 2021) samples extra
"pseudo-features", mostly for the tail; only the final linear layer is retrained on them.

  encoder    ResNet-32 (CIFAR, digits) / ResNet-10 (ImageNet-LT) trained with CE: the CE row
  encode     penultimate features and CE logits of train / val / test
  diffusion  class-conditional DDPM on standardised features (cosine schedule, residual MLP)
  generate   DDIM pseudo-features, max(round(ratio * n_c), 5) per class (or up to n_max)
  finetune   the final linear layer on real + pseudo features; cRT on class-balanced real ones
  evaluate   rows CE, LA, CE+LDMLR, LA+LDMLR, cRT; Frechet distances of the pseudo-features

    python ldmlr.py                                      # digits, offline, 2 CPU cores, 1.5 min
    python ldmlr.py --dataset cifar10 --imb 100          # downloads CIFAR-10 (GPU)
    torchrun --nproc_per_node 4 ldmlr.py --dataset cifar100 --imb 100   # 4 GPUs (DDP)

Measured on digits, r = 20, test top-1 %, mean of seeds 0, 1, 2 (overall / Few), with
DATASETS=digits RATIOS=20 SEEDS="0 1 2" bash run_all.sh (README):
    CE 92.42 / 85.00   LA 93.00 / 88.12   cRT 93.58 / 86.46
    CE+LDMLR 93.58 / 87.29   LA+LDMLR 94.17 / 89.17
One run takes 87 s on two idle CPU cores (median of 3, /usr/bin/time, torch 2.14.1).
"""
import argparse
import contextlib
import copy
import dataclasses
import datetime
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import lt_data
from lt_data import BadInput

METHOD = "ldmlr"
STAGES = ["encoder", "encode", "diffusion", "generate", "finetune", "evaluate"]


# -------------------------------------------------------------------------------------------------
# Config: one field per flag (--ft-lr for ft_lr); DEFAULTS holds the per-dataset values.


def opt(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    # ---- common to both scripts
    dataset: str = opt("digits", "benchmark; sets the per-dataset defaults", lt_data.DATASETS)
    imb: float = opt(None, "imbalance ratio r >= 1 (head/tail); ignored for imagenet_lt")
    seed: int = opt(0, "one seed for data subsampling (0 = the standard CIFAR-LT subset), "
                    "init and training")
    data_root: str = opt("./data", "where datasets live")
    download: bool = opt(True, "download a missing CIFAR with torchvision (md5-checked)")
    out: str = opt(None, "run directory (default runs/<method>_<dataset>_imb<R>_seed<S>)")
    device: str = opt("auto", "device", ("auto", "cpu", "cuda", "mps"))
    smoke: bool = opt(False, "tiny budgets for every stage, so the pipeline runs in seconds")
    redo: str = opt(None, "recompute this stage and every stage after it", STAGES)
    eval_split: str = opt("test", "evaluate on the test set, or on the validation split carved "
                          "from the training data (digits, ImageNet-LT)", ("test", "val"))
    workers: int = opt(4, "DataLoader workers for datasets read from disk (ImageNet-LT)")
    precision: str = opt("auto", "autocast of forward passes; auto = bf16 on CUDA, else fp32",
                         ("auto", "fp32", "bf16"))
    channels_last: bool = opt(True, "channels_last memory format for the conv nets on CUDA")
    compile: bool = opt(False, "torch.compile the trained models (pays off on long GPU runs)")
    estimate: bool = opt(False, "time every stage on random data of the dataset's shape and "
                         "project the configured run's wall time and memory; writes nothing")
    # ---- stage-1 classifier: the LDAM-DRW recipe for ResNet-32 on CIFAR-LT (Cao et al. 2019)
    arch: str = opt(None, "classifier backbone", ("resnet32", "resnet10", "resnet50"))
    epochs: int = opt(None, "classifier epochs (LDAM-DRW: 200)")
    batch_size: int = opt(None, "classifier batch size, over all processes (LDAM-DRW: 128)")
    lr: float = opt(None, "SGD learning rate (LDAM-DRW: 0.1); x0.01 after 80% of the epochs, "
                    "x1e-4 after 90% (epochs 160 / 180 of 200)")
    warmup_epochs: int = opt(None, "linear warm-up epochs, lr * e / warm-up (LDAM-DRW: 5)")
    weight_decay: float = opt(None, "SGD weight decay (LDAM-DRW: 2e-4)")
    la_tau: float = opt(1.0, "post-hoc logit adjustment strength of the LA rows (Menon et al.: 1)")
    mixup: float = opt(0.0, "mixup alpha of the encoder (official LDMLR code: 0.5; 0 = off, the "
                       "CE baseline diffult.py trains too)")
    # ---- LDMLR's feature diffusion (the denoiser and its training are ours; the official code
    # trains a kernel-1 1-D UNet with SGD for 201 epochs)
    timesteps: int = opt(1000, "diffusion steps T (LDMLR: 1000)")
    diffusion_steps: int = opt(None, "denoiser training steps")
    diffusion_batch: int = opt(None, "denoiser batch size, over all processes")
    diffusion_lr: float = opt(1e-3, "Adam learning rate of the denoiser")
    ema_decay: float = opt(None, "EMA decay of the denoiser weights used for sampling")
    ckpt_every: int = opt(None, "diffusion checkpoint interval in steps")
    denoiser_width: int = opt(None, "width of the residual-MLP denoiser")
    denoiser_blocks: int = opt(None, "residual blocks of the denoiser")
    # ---- LDMLR: generation and the final layer
    sample_steps: int = opt(None, "DDIM steps (ours; the official code runs all T ancestral steps)")
    eta: float = opt(0.0, "DDIM stochasticity eta (0 = deterministic DDIM)")
    clip_x0: bool = opt(True, "clamp DDIM's x0 prediction per dimension to the range of the real "
                        "standardised features (ours)")
    ratio: float = opt(0.2, "pseudo-features per class: max(round(ratio * n_c), 5) (official: 0.2)")
    generate_for: str = opt("all", "classes that get pseudo-features: all, or one shot group (the "
                            "paper: tail-focused generation helps most)",
                            ("all", "many", "medium", "few"))
    fill: bool = opt(False, "top every chosen class up to n_max instead of the ratio rule (ours)")
    ft_epochs: int = opt(400, "final-layer epochs (official code: 400)")
    ft_lr: float = opt(1e-3, "final-layer Adam learning rate (LDMLR: 1e-3)")
    ft_weight_decay: float = opt(1e-5, "final-layer Adam weight decay (LDMLR: 1e-5)")
    ft_batch: int = opt(1024, "final-layer batch size (LDMLR: 1024)")


CIFAR = dict(imb=100, arch="resnet32", epochs=200, batch_size=128, lr=0.1, warmup_epochs=5,
             weight_decay=2e-4, diffusion_steps=20_000, diffusion_batch=256, ema_decay=0.9995,
             ckpt_every=2000, denoiser_width=512, denoiser_blocks=4, sample_steps=100)
DEFAULTS = {
    # The papers' stage-1 recipe. Ours: the denoiser's size, budget and EMA; 100 DDIM steps.
    "cifar10": CIFAR,
    "cifar100": CIFAR,
    # Ours, the papers do not give them: the usual ResNet-10 recipe (90 epochs, batch 256, wd
    # 5e-4) and a wider denoiser for its 512-d features.
    "imagenet_lt": dict(CIFAR, imb=256, arch="resnet10", epochs=90, batch_size=256,
                        weight_decay=5e-4, diffusion_steps=100_000, diffusion_batch=512,
                        ckpt_every=5000, denoiser_width=1024),
    # Ours: budgets for 2 CPU cores; filling the Few classes up to n_max, the denoiser's 6000
    # steps and the final layer's 6000 epochs were chosen on the validation split (README, "How
    # the digits defaults were chosen"). 773 vectors (369 real, 404 pseudo) are one Adam step
    # an epoch, so 6000 epochs are about the official run's 6000 steps (CIFAR-10-LT, real +
    # pseudo: 400 x ceil(14,886 / 1024)).
    "digits": dict(imb=20, arch="resnet32", epochs=60, batch_size=64, lr=0.05, warmup_epochs=5,
                   weight_decay=5e-4, diffusion_steps=6000, diffusion_batch=256, ema_decay=0.999,
                   ckpt_every=1000, denoiser_width=128, denoiser_blocks=3, sample_steps=50,
                   fill=True, generate_for="few", ft_epochs=6000),
}
SMOKE = dict(epochs=2, diffusion_steps=40, ckpt_every=20, denoiser_width=64, denoiser_blocks=1,
             sample_steps=5, ft_epochs=5)
# Fields that do not change what a run computes: a run directory may be reused with other values.
NOT_RESULTS = ("out", "device", "data_root", "download", "redo", "workers", "channels_last",
               "compile", "estimate")
# Fields no stage before the named one reads: `--redo STAGE` may change them in a finished run.
REDO_FIELDS = {"diffusion": ("timesteps", "diffusion_steps", "diffusion_batch", "diffusion_lr",
                             "ema_decay", "ckpt_every", "denoiser_width", "denoiser_blocks"),
               "generate": ("sample_steps", "eta", "clip_x0", "ratio", "generate_for", "fill"),
               "finetune": ("ft_epochs", "ft_lr", "ft_weight_decay", "ft_batch"),
               "evaluate": ("eval_split", "la_tau")}


# -------------------------------------------------------------------------------------------------
# Classifier: ResNet-32 for CIFAR / digits (He et al. 2016, option-A shortcuts); torchvision's
# ResNet-10 / ResNet-50 for ImageNet-LT. .features(x) is the penultimate feature, .fc the head.


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
        if self.pad is None:
            return F.relu(out + x)
        # Option A: subsample and zero-pad the channels; no parameters in the shortcut.
        return F.relu(out + F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad)))


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


class TorchvisionResNet(torchvision.models.ResNet):
    """torchvision's ImageNet ResNet with .features: ResNet-10 = BasicBlock [1, 1, 1, 1] (512-d,
    the ImageNet-LT backbone of Liu et al. 2019), ResNet-50 = Bottleneck [3, 4, 6, 3] (2048-d)."""

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def make_classifier(arch, num_classes, in_channels):
    if arch == "resnet32":
        return ResNet32(num_classes, in_channels)
    resnet = torchvision.models.resnet
    if arch == "resnet10":
        net = TorchvisionResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
    else:
        net = TorchvisionResNet(resnet.Bottleneck, [3, 4, 6, 3], num_classes=num_classes)
    if in_channels != 3:  # e.g. --arch resnet10 on the one-channel digits
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return net


# -------------------------------------------------------------------------------------------------
# Denoiser for feature vectors (ours: a residual MLP; the official code's 1-D UNet, whose
# convolutions all have kernel size 1, is a per-vector network too). eps_theta(x_t, t, y).


def timestep_embedding(t, dim):
    """Sinusoidal embedding of integer steps t (B,) -> (B, dim) (Vaswani et al. 2017, as in DDPM):
    [sin(t w_k), cos(t w_k)] with w_k = 10000^(-k / (dim / 2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class MLPBlock(nn.Module):
    """h + W2 SiLU(W1 LN(h) + E emb): a pre-norm residual block, conditioned through its input."""

    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.emb = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)
        nn.init.zeros_(self.fc2.weight)  # each block starts as the identity
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h, emb):  # (B, width), (B, width) -> (B, width)
        return h + self.fc2(F.silu(self.fc1(self.norm(h)) + self.emb(emb)))


class Denoiser(nn.Module):
    """Predicts the noise eps in a standardised feature vector x_t (B, D) of class y at step t."""

    def __init__(self, dim, num_classes, width, blocks):
        super().__init__()
        self.width = width
        self.inp = nn.Linear(dim, width)
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.label = nn.Embedding(num_classes, width)
        self.blocks = nn.ModuleList(MLPBlock(width) for _ in range(blocks))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x, t, y):  # (B, D), (B,) step indices, (B,) labels -> (B, D)
        emb = F.silu(self.time(timestep_embedding(t, self.width)) + self.label(y))
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)


# -------------------------------------------------------------------------------------------------
# Diffusion math (Ho et al. 2020 = DDPM; Song et al. 2021 = DDIM). Step indices t are 0-based:
# index t is the paper's step t + 1, abar[t] = prod_{s <= t} (1 - beta_s), and "abar[-1]" = 1 is
# the clean data. Schedules are float64 CPU tensors; _at gathers them for a batch of indices.


def cosine_schedule(T, s=0.008, max_beta=0.999):
    """Improved DDPM's cosine schedule (Nichol & Dhariwal 2021, Eq. 17): abar(t) = f(t) / f(0),
    f(t) = cos^2((t / T + s) / (1 + s) * pi / 2), beta_t = 1 - abar(t) / abar(t - 1) clipped to
    max_beta (their fix of the singularity at t = T). Returns (betas, abar) in float64, abar as
    cumprod(1 - betas) so the two agree; checked here: 0 < beta < 1, abar strictly decreasing."""
    t = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    abar = torch.cumprod(1 - betas, dim=0)
    if not (((betas > 0) & (betas < 1)).all() and (abar[1:] < abar[:-1]).all()):
        raise BadInput(f"bad cosine schedule for T = {T}: need 0 < beta < 1, abar decreasing")
    return betas, abar


def _at(values, t, x):
    """values[t] for a batch of indices t (or one int), shaped to broadcast against x."""
    v = values[t] if torch.is_tensor(t) else values[t].expand(x.shape[0])
    return v.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))


def q_sample(x0, t, noise, abar):
    """DDPM Eq. 4 in closed form: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, eps ~ N(0, I)."""
    return _at(abar.sqrt(), t, x0) * x0 + _at((1 - abar).sqrt(), t, x0) * noise


def ddim_step(x_t, eps, a_t, a_prev, eta=0.0, noise=None, clip=None):
    """DDIM Eq. 12 (Song et al. 2021), one step from abar = a_t to a_prev (floats; 1 = the data):
        x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps + sigma z,
        sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)   (Eq. 16),
    eta = 0 deterministic, eta = 1 DDPM-like. clip = (lo, hi), numbers or per-dimension tensors:
    x0_hat is clamped into that range and eps re-derived from it (as guided-diffusion does)."""
    x0 = (x_t - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
    if clip is not None:
        x0 = x0.clamp(*clip)
        eps = (x_t - a_t ** 0.5 * x0) / (1 - a_t) ** 0.5
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    x_prev = a_prev ** 0.5 * x0 + max(1 - a_prev - sigma ** 2, 0.0) ** 0.5 * eps
    return x_prev if noise is None else x_prev + sigma * noise


@torch.no_grad()
def ddim_sample(model, y, dim, abar, steps, eta=0.0, clip=None, bf16=False, x=None):
    """One x0 (dim,) per label of y (B,) from `steps` DDIM steps evenly spaced from T - 1 down to
    0, so the first starts from pure noise (ours; DDIM Sec. 4.2 spaces them from 0 and may never
    visit T). x_T (default: drawn) and the noise come from the global RNG; clip: see ddim_step."""
    T = len(abar)
    ts = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long().tolist()
    x = torch.randn(len(y), dim, device=y.device) if x is None else x
    for i, t in enumerate(ts):
        a_prev = abar[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
        with autocast(y.device, bf16):  # the update itself in fp32
            eps = model(x, torch.full_like(y, t), y).float()
        noise = torch.randn_like(x) if eta > 0 else None
        x = ddim_step(x, eps, abar[t].item(), a_prev, eta, noise, clip)
    return x


# -------------------------------------------------------------------------------------------------
# Losses and the small loops of LDMLR: the denoiser's loss, how many pseudo-features, the head.


def ddpm_loss(model, x0, y, abar):
    """DDPM's L_simple (Ho et al. 2020, Algorithm 1, Eq. 14): ||eps - eps_theta(x_t, t, y)||^2,
    a mean over batch and dimensions; t uniform over the T steps, eps ~ N(0, I), from the global
    RNG."""
    t = torch.randint(len(abar), (len(x0),), device=x0.device)
    noise = torch.randn_like(x0)
    return F.mse_loss(model(q_sample(x0, t, noise, abar), t, y).float(), noise)


def generation_counts(counts, ratio, generate_for="all", fill=False, n_max=None):
    """Pseudo-features per class: max(round(ratio * n_c), 5) (the official code's rule and its
    Python round), or n_max - n_c with fill; 0 for classes outside the chosen shot group."""
    groups = lt_data.shot_groups(counts)
    chosen = range(len(counts)) if generate_for == "all" else groups[generate_for]
    out = []
    for c, n in enumerate(counts):
        if c not in chosen:
            out.append(0)
        elif fill:
            out.append(max(int(n_max) - int(n), 0))
        else:
            out.append(max(round(ratio * n), 5))
    return out


def balanced_indices(labels, n, generator):
    """n indices drawn with replacement, every class present equally likely (a class uniformly,
    then an instance of it uniformly): the class-balanced sampler of cRT (Kang et al. 2020)."""
    labels = labels.cpu()
    order = torch.argsort(labels, stable=True)  # instances grouped by class
    classes, counts = torch.unique(labels, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    pick = torch.randint(0, len(classes), (n,), generator=generator)
    within = (torch.rand(n, generator=generator, dtype=torch.float64) * counts[pick]).long()
    return order[starts[pick] + within.clamp(max=counts[pick] - 1)]


def train_linear(fc, feats, labels, cfg, device, key, balanced=False):
    """Retrain only the final linear layer `fc` on fixed features: CE, Adam (LDMLR: lr 1e-3, wd
    1e-5, batch 1024). An epoch is one pass in the order of a generator seeded by (seed, key,
    epoch), or (balanced: cRT) as many class-balanced draws. The LAST epoch is kept (ours: the
    official code keeps the best test epoch). No checkpoint: an interrupted run redoes it."""
    fc, feats, labels = fc.to(device), feats.to(device), labels.to(device)
    opt_ = torch.optim.Adam(fc.parameters(), lr=cfg.ft_lr, weight_decay=cfg.ft_weight_decay)
    n = len(labels)
    for epoch in tqdm(range(cfg.ft_epochs), key, unit="ep", disable=rank() > 0):
        gen = rng(cfg.seed, key, epoch)
        order = balanced_indices(labels, n, gen) if balanced else torch.randperm(n, generator=gen)
        for idx in order.to(device).split(cfg.ft_batch):
            loss = F.cross_entropy(fc(feats[idx]), labels[idx])
            opt_.zero_grad(set_to_none=True)
            loss.backward()
            opt_.step()
    if not (math.isfinite(loss.item()) and torch.isfinite(fc.weight).all()):
        raise FloatingPointError(f"{key}: the loss or the weights became non-finite by epoch "
                                 f"{cfg.ft_epochs}; lower --ft-lr")
    return fc.cpu()


# -------------------------------------------------------------------------------------------------
# Stage-1 recipe: CE with SGD, LDAM-DRW's schedule, random crop + flip on the device, and mixup as
# an option (the official LDMLR code's encoder).


def lr_at(epoch, cfg):
    """LDAM-DRW's adjust_learning_rate for the 1-based epoch e: lr * e / warm-up for the first
    epochs, then lr, lr * 0.01 after 80 % of the epochs and lr * 1e-4 after 90 % (after epochs
    160 and 180 of 200)."""
    e = epoch + 1
    if e <= cfg.warmup_epochs:
        return cfg.lr * e / cfg.warmup_epochs
    if e > int(0.9 * cfg.epochs):
        return cfg.lr * 1e-4
    if e > int(0.8 * cfg.epochs):
        return cfg.lr * 0.01
    return cfg.lr


def augment(x, pad, flip):
    """RandomCrop(size, padding=pad) and, if flip, a horizontal flip, per image of the uint8 batch
    x (B, C, H, W), on its device, with draws from the global RNG."""
    B, C, H, W = x.shape
    dy, dx = (torch.randint(0, 2 * pad + 1, (B, 1, 1, 1), device=x.device) for _ in range(2))
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = (dy + torch.arange(H, device=x.device).view(1, 1, H, 1)).expand(B, C, H, W + 2 * pad)
    cols = (dx + torch.arange(W, device=x.device).view(1, 1, 1, W)).expand(B, C, H, W)
    x = xp.gather(2, rows).gather(3, cols)  # (B, C, H, W)
    if flip:
        x = torch.where(torch.rand(B, 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
    return x


def normalise(x, data):
    """uint8 (B, C, H, W) -> float, scaled to [0, 1] then standardised per channel."""
    mean = torch.tensor(data.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255.0 - mean) / std


def batches(dataset, order, batch_size, workers):
    """(uint8 images, labels, indices) of `dataset` in `order`, batch by batch: in-memory images
    are sliced directly, others read through a DataLoader (ImageNet-LT: with its transforms)."""
    chunks = order.split(batch_size)
    if in_memory(dataset):
        for idx in chunks:
            yield dataset.images[idx], dataset.labels[idx], idx
        return
    loader = torch.utils.data.DataLoader(dataset, batch_size, sampler=order.tolist(),
                                         num_workers=workers)
    for (x, y), idx in zip(loader, chunks):
        yield x, y, idx


def train_classifier(model, dataset, data, cfg, device, ckpt_path, key, mixup=0.0):
    """Train `model` on `dataset` with CE, on mixed pairs if mixup > 0 (see below), SGD with
    momentum 0.9 and lr_at's schedule. One checkpoint per epoch, resumed from. Epoch e shuffles
    with a generator seeded by (seed, key, e) and reseeds the augmentation's RNG from (seed, key,
    e, rank), so a resumed run repeats an uninterrupted one. Each rank trains on its share of the
    epoch's order; DDP averages the gradients."""
    place(model, cfg, device)
    if world() > 1 and device.type == "cuda":  # batch statistics over every rank's images
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt_ = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9,
                           weight_decay=cfg.weight_decay)
    start = resume(ckpt_path, {"model": model, "optimizer": opt_}, "epoch", -1) + 1
    if start:
        log(f"{key}: resuming after {start} of {cfg.epochs} epochs")
    net, bf16 = for_training(model, cfg, device), use_bf16(cfg, device)
    if in_memory(dataset):  # on the device once, not batch by batch
        dataset = lt_data.TensorImages(dataset.images.to(device), dataset.labels.to(device))
    pad, flip = max(1, data.image_size // 8), data.name != "digits"  # a mirrored digit is none
    bar = tqdm(range(start, cfg.epochs), key, initial=start, total=cfg.epochs, unit="ep",
               disable=rank() > 0)
    for epoch in bar:
        for g in opt_.param_groups:
            g["lr"] = lr_at(epoch, cfg)
        order = torch.randperm(len(dataset), generator=rng(cfg.seed, key, epoch))
        order = order[:len(order) - len(order) % world()][rank()::world()]  # equal shares
        torch.manual_seed(seed_of(cfg.seed, key, epoch, rank()))
        model.train()
        total, t0 = torch.zeros((), device=device), time.time()
        for x, y, idx in batches(dataset, order, cfg.batch_size // world(), cfg.workers):
            x = x.to(device, non_blocking=True)
            x = normalise(augment(x, pad, flip) if in_memory(dataset) else x, data)
            y = y.to(device)
            if mixup > 0:  # Zhang et al. 2018; lam and pairs from the RNG seeded above
                lam = torch.distributions.Beta(mixup, mixup).sample().item()
                pair = torch.randperm(len(y), device=device)
                x = lam * x + (1 - lam) * x[pair]
            with autocast(device, bf16):
                logits = net(x).float()
            loss = F.cross_entropy(logits, y, reduction="none")
            if mixup > 0:
                loss = lam * loss + (1 - lam) * F.cross_entropy(logits, y[pair], reduction="none")
            loss = loss.mean()
            opt_.zero_grad(set_to_none=True)
            loss.backward()
            opt_.step()
            total += loss.detach()
        mean_loss = total.item() / max(1, -(-len(order) // (cfg.batch_size // world())))
        check_finite(mean_loss, [model], key, f"epoch {epoch + 1}", ckpt_path)
        bar.set_postfix(loss=f"{mean_loss:.3f}", img_s=f"{len(order) / (time.time() - t0):.0f}")
        save(ckpt_path, model=model.state_dict(), optimizer=opt_.state_dict(), epoch=epoch,
             config=dataclasses.asdict(cfg))
    return model


@torch.no_grad()
def predict(model, dataset, data, device, workers=0, batch_size=512):
    """Logits (N, C) and penultimate features (N, D) of un-augmented images, in dataset order."""
    model.eval().to(device)
    logits, feats = [], []
    for x, _, _ in batches(dataset, torch.arange(len(dataset)), batch_size, workers):
        f = model.features(normalise(x.to(device), data))
        feats.append(f.float().cpu())
        logits.append(model.fc(f).float().cpu())
    return torch.cat(logits), torch.cat(feats)


# -------------------------------------------------------------------------------------------------
# LDMLR's stages. Each writes <out>/<stage>/ and returns the record that goes into done.json.


def load_features(cfg):
    """The encode stage's {split: {"features", "labels", "logits"}} and "fc", the CE head."""
    return load_checkpoint(os.path.join(cfg.out, "encode", "features.pt"), ("train",))


def ce_head(enc):
    """A fresh copy of the CE model's final linear layer."""
    fc = nn.Linear(enc["fc"]["weight"].shape[1], enc["fc"]["weight"].shape[0])
    fc.load_state_dict(enc["fc"])
    return fc


def load_pseudo(cfg, data, dim):
    """The generate stage's {"features", "labels", "counts"}, checked: a file of another feature
    size or dtype, labels outside the classes or other counts than this run generates (another
    run's, say) is BadInput here instead of a crash or a silent mix in the final layer."""
    path = os.path.join(cfg.out, "generate", "pseudo.pt")
    pseudo = load_checkpoint(path, ("features", "labels", "counts"))
    x, y, C = pseudo["features"], pseudo["labels"], data.num_classes
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
    elif torch.bincount(y, minlength=C).tolist() != expected or list(pseudo["counts"]) != expected:
        problem = f"other per-class counts than this run generates ({expected})"
    else:
        return pseudo
    raise BadInput(f"{path} holds {problem}; rerun with --redo generate")


def stage_encoder(cfg, data, device):
    """Stage 1: the CE classifier on the long-tailed images, the CE row and the encoder. Init, keys
    and recipe are diffult.py's stage 1, so without mixup both scripts train the same CE model."""
    torch.manual_seed(seed_of(cfg.seed, "stage-1 init"))
    model = make_classifier(cfg.arch, data.num_classes, data.channels)
    model = train_classifier(model, data.train, data, cfg, device,
                             os.path.join(cfg.out, "encoder", "ckpt.pt"), "stage-1", cfg.mixup)
    return {"epochs": cfg.epochs, "mixup": cfg.mixup}


def stage_encode(cfg, data, device):
    """Stage 2: penultimate features (of un-augmented images) and CE logits of every split."""
    model = make_classifier(cfg.arch, data.num_classes, data.channels)
    load_checkpoint(os.path.join(cfg.out, "encoder", "ckpt.pt"), into={"model": model})
    place(model, cfg, device)
    out = {"fc": {k: v.cpu() for k, v in model.fc.state_dict().items()}}
    for name, split in (("train", data.train_plain), ("val", data.val), ("test", data.test)):
        if split is not None:
            logits, feats = predict(model, split, data, device, cfg.workers)
            out[name] = {"features": feats, "labels": split.labels, "logits": logits}
    save(os.path.join(cfg.out, "encode", "features.pt"), **out)
    return {"feature_dim": out["train"]["features"].shape[1], "splits": sorted(set(out) - {"fc"})}


def stage_diffusion(cfg, data, device):
    """Stage 3: a class-conditional DDPM on the training features, standardised per dimension
    with their mean and std (ours: the official code clips the raw post-ReLU features to [-1, 1],
    which truncates them), trained on L_simple with Adam; the EMA weights are sampled from."""
    ckpt_path = os.path.join(cfg.out, "diffusion", "ckpt.pt")
    enc = load_features(cfg)
    feats, labels = enc["train"]["features"], enc["train"]["labels"]
    mu, sd = feats.mean(0), feats.std(0).clamp(min=1e-6)  # a dead (constant) dimension stays 0
    x_all, y_all = ((feats - mu) / sd).to(device), labels.to(device)  # (N, D), (N,)
    _, abar = cosine_schedule(cfg.timesteps)
    torch.manual_seed(seed_of(cfg.seed, "diffusion init"))
    model = Denoiser(feats.shape[1], data.num_classes, cfg.denoiser_width, cfg.denoiser_blocks)
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt_ = torch.optim.Adam(model.parameters(), lr=cfg.diffusion_lr)
    start = resume(ckpt_path, {"model": model, "ema": ema, "optimizer": opt_}, "step", 0)
    if start:
        log(f"diffusion: resuming at step {start}")
    net, bf16 = for_training(model, cfg, device), use_bf16(cfg, device)
    bar = tqdm(range(start, cfg.diffusion_steps), "diffusion", initial=start,
               total=cfg.diffusion_steps, unit="step", disable=rank() > 0)
    total, since, mean_loss = torch.zeros((), device=device), 0, None
    for step in bar:
        torch.manual_seed(seed_of(cfg.seed, "diffusion", step, rank()))  # batch, t and noise
        # Batches uniform over the instances, as the official code (with replacement: ours).
        idx = torch.randint(len(y_all), (cfg.diffusion_batch // world(),), device=device)
        with autocast(device, bf16):
            loss = ddpm_loss(net, x_all[idx], y_all[idx], abar)
        opt_.zero_grad(set_to_none=True)
        loss.backward()
        opt_.step()
        # EMA with the warm-up min(decay, (1 + k) / (10 + k)) (ours), so that short runs do not
        # sample from weights still close to the random init.
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - decay)
        total += loss.detach()
        since, done = since + 1, step + 1
        if done % 100 == 0 or done % cfg.ckpt_every == 0 or done == cfg.diffusion_steps:
            mean_loss = total.item() / since  # the one host-device sync of an interval
            check_finite(mean_loss, [], "diffusion", f"step {done}", ckpt_path)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            total.zero_()
            since = 0
        if done % cfg.ckpt_every == 0 or done == cfg.diffusion_steps:
            check_finite(0.0, [model, ema], "diffusion", f"step {done}", ckpt_path)
            save(ckpt_path, model=model.state_dict(), ema=ema.state_dict(),
                 optimizer=opt_.state_dict(), step=done, mu=mu, sd=sd,
                 config=dataclasses.asdict(cfg))
    return {"steps": cfg.diffusion_steps, "final_loss": mean_loss}


def stage_generate(cfg, data, device):
    """Stage 4: DDIM pseudo-features of the EMA denoiser, per class as generation_counts says,
    mapped back to the encoder's feature space (no clipping there)."""
    real = load_features(cfg)["train"]["features"]
    dim = real.shape[1]
    model = Denoiser(dim, data.num_classes, cfg.denoiser_width, cfg.denoiser_blocks)
    ckpt = load_checkpoint(os.path.join(cfg.out, "diffusion", "ckpt.pt"), ("mu", "sd"),
                           {"ema": model})
    model.to(device).eval()
    mu, sd = ckpt["mu"], ckpt["sd"]
    _, abar = cosine_schedule(cfg.timesteps)
    counts = generation_counts(data.train_counts, cfg.ratio, cfg.generate_for, cfg.fill,
                               data.n_max)
    labels = torch.repeat_interleave(torch.arange(data.num_classes), torch.tensor(counts))
    # The box (ours): with the cosine schedule abar_T ~ 2e-9, so the first x0 prediction divides
    # the model's eps error by sqrt(abar_T) ~ 5e-5 and lands thousands of standard deviations
    # away. Every real standardised feature lies in the box, so it never cuts a realistic one.
    z = (real - mu) / sd
    clip = (z.min(0).values.to(device), z.max(0).values.to(device)) if cfg.clip_x0 else None
    torch.manual_seed(seed_of(cfg.seed, "generate"))
    feats = [torch.zeros(0, dim)]
    for y in tqdm(labels.split(1024), "generate", unit="batch"):
        x0 = ddim_sample(model, y.to(device), dim, abar, cfg.sample_steps, cfg.eta, clip,
                         use_bf16(cfg, device))
        feats.append(x0.cpu() * sd + mu)
    feats = torch.cat(feats)
    if not torch.isfinite(feats).all():
        raise FloatingPointError("generate: the sampler produced non-finite features; retrain "
                                 "the denoiser (--redo diffusion)")
    save(os.path.join(cfg.out, "generate", "pseudo.pt"), features=feats, labels=labels,
         counts=counts)
    return {"counts": counts, "total": len(labels)}


def stage_finetune(cfg, data, device):
    """Stage 5: the final linear layer retrained from the CE head on real + pseudo features
    (LDMLR), and on class-balanced real features (cRT, Kang et al. 2020; ours: from the CE head,
    not re-initialised, so the two rows differ only in the data they see)."""
    enc = load_features(cfg)
    real_f, real_y = enc["train"]["features"], enc["train"]["labels"]
    pseudo = load_pseudo(cfg, data, real_f.shape[1])
    feats = torch.cat([real_f, pseudo["features"]])
    labels = torch.cat([real_y, pseudo["labels"]])
    ldmlr = train_linear(ce_head(enc), feats, labels, cfg, device, "finetune LDMLR")
    crt = train_linear(ce_head(enc), real_f, real_y, cfg, device, "finetune cRT", balanced=True)
    save(os.path.join(cfg.out, "finetune", "heads.pt"), ldmlr=ldmlr.state_dict(),
         crt=crt.state_dict())
    return {"real": len(real_y), "pseudo": len(pseudo["labels"])}


def stage_evaluate(cfg, data, device):
    """Stage 6: the rows on the evaluation split. LA and LA+LDMLR subtract la_tau * log of the
    REAL training counts (Menon et al. 2021): the official "label shift" row, which adjusts the
    fine-tuned head with the real per-class counts too."""
    enc = load_features(cfg)
    heads = {"ldmlr": ce_head(enc), "crt": ce_head(enc)}
    load_checkpoint(os.path.join(cfg.out, "finetune", "heads.pt"), into=heads)
    split, counts = enc[cfg.eval_split], data.train_counts
    with torch.no_grad():
        ce, ldmlr = split["logits"], heads["ldmlr"](split["features"])
        scores = {"CE": ce, "LA": lt_data.logit_adjust(ce, counts, cfg.la_tau),
                  "CE+LDMLR": ldmlr, "LA+LDMLR": lt_data.logit_adjust(ldmlr, counts, cfg.la_tau),
                  "cRT": heads["crt"](split["features"])}
    rows = {name: lt_data.accuracy_report(s.argmax(1), split["labels"], counts)
            for name, s in scores.items()}
    real_f, real_y = enc["train"]["features"], enc["train"]["labels"]
    pseudo = load_pseudo(cfg, data, real_f.shape[1])
    fake_f, fake_y = pseudo["features"], pseudo["labels"]
    # Frechet distance in the encoder's feature space (ours; the papers report image FID). Over
    # all classes it also reflects that the pseudo-features' class mix is not the real one.
    generated = {"counts": pseudo["counts"], "total": len(fake_y), "feature_dim": real_f.shape[1],
                 "frechet": lt_data.frechet_or_none(real_f, fake_f),
                 "frechet_per_class": [lt_data.frechet_or_none(real_f[real_y == c],
                                                               fake_f[fake_y == c])
                                       for c in range(data.num_classes)]}
    return {"rows": rows, "generated": generated}


PIPELINE = {"encoder": stage_encoder, "encode": stage_encode, "diffusion": stage_diffusion,
            "generate": stage_generate, "finetune": stage_finetune, "evaluate": stage_evaluate}
ALL_RANKS = ("encoder", "diffusion")  # the others: rank 0 alone


def run(cfg):
    """Every stage that is not done yet, then results.json and the table."""
    device = setup(cfg)
    data = load_data(cfg)
    return run_stages(cfg, data, device)


# =================================================================================================
# Plumbing a reader of the paper may skip: flags, several processes, files and stages, main.


# The range of every numeric flag (parse_config also checks that floats are finite).
RULES = {
    **dict.fromkeys(("epochs", "batch_size", "lr", "timesteps", "diffusion_steps",
                     "diffusion_batch", "diffusion_lr", "ckpt_every", "denoiser_width",
                     "denoiser_blocks", "sample_steps", "ft_epochs", "ft_lr", "ft_batch"),
                    (lambda v: v > 0, "> 0")),
    **dict.fromkeys(("warmup_epochs", "weight_decay", "workers", "la_tau", "mixup", "ratio",
                     "ft_weight_decay"), (lambda v: v >= 0, ">= 0")),
    "ema_decay": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "eta": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "seed": (lambda v: 0 <= v < 2 ** 32, "in 0 .. 2^32 - 1"),
    "imb": (lambda v: v >= 1, ">= 1 (head / tail)"),
}


def validate(cfg):
    """What RULES cannot say: how flags constrain each other, and the denoiser's shape."""
    if cfg.sample_steps > cfg.timesteps:
        raise BadInput(f"--sample-steps must be <= --timesteps ({cfg.timesteps})")
    if cfg.denoiser_width % 2:
        raise BadInput(f"--denoiser-width must be even (the sin / cos time embedding), got "
                       f"{cfg.denoiser_width}")


def probe(cfg, data, counts, stage, n, device):
    """--estimate's budget n (1, 2, 4, ...) of `stage` on the miniature `data`: (config changes,
    work done at that budget, work of the configured run on the real class counts, unit)."""
    M, N, test = len(data.train), sum(counts), lt_data.SHAPES[cfg.dataset][4]
    small = sum(generation_counts(data.train_counts, cfg.ratio, cfg.generate_for, cfg.fill,
                                  data.n_max))
    made = sum(generation_counts(counts, cfg.ratio, cfg.generate_for, cfg.fill, max(counts)))
    work = {"encoder": ({"epochs": n}, n * M, cfg.epochs * N, "img"),
            "encode": ({}, 3 * M, N + test, "img"),
            "diffusion": ({"diffusion_steps": 2 * n}, 2 * n * cfg.diffusion_batch,
                          cfg.diffusion_steps * cfg.diffusion_batch, "vec"),
            "generate": ({"sample_steps": 2 * n}, 2 * n * small, cfg.sample_steps * made,
                         "vec-step"),
            "finetune": ({"ft_epochs": n}, n * (2 * M + small), cfg.ft_epochs * (2 * N + made),
                         "vec"),
            "evaluate": ({}, M, test, "vec")}
    return work[stage]


class ArgParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, not argparse's usage block
        raise BadInput(message)


def parse_config(argv=None):
    """Field defaults, then the dataset's DEFAULTS, then SMOKE (--smoke), then the flags given."""
    parser = ArgParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(Config):
        kind = {"action": argparse.BooleanOptionalAction} if f.type is bool else \
            {"type": f.type, "choices": f.metadata["choices"]}
        parser.add_argument(flag(f.name), help=f.metadata["help"].replace("%", "%%"), **kind)
    args = vars(parser.parse_args(argv))
    values = {f.name: f.default for f in dataclasses.fields(Config)}
    values.update(DEFAULTS[args["dataset"] or Config.dataset])
    values.update(SMOKE if args["smoke"] else {})
    values.update({k: v for k, v in args.items() if v is not None})
    cfg = Config(**values)
    for f in dataclasses.fields(cfg):  # nan and inf slip through the range checks
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise BadInput(f"{flag(f.name)} must be a finite number, got {value}")
    for name, (ok, rule) in RULES.items():
        if not ok(getattr(cfg, name)):
            raise BadInput(f"{flag(name)} must be {rule}, got {getattr(cfg, name)}")
    validate(cfg)
    cfg.out = cfg.out or f"runs/{METHOD}_{cfg.dataset}_imb{cfg.imb:g}_seed{cfg.seed}"
    return cfg


def flag(name):
    return "--" + name.replace("_", "-")


def log(message):
    if rank() == 0:
        print(f"[{METHOD}] {message}", file=sys.stderr, flush=True)


def seed_of(*key):
    """A 32-bit seed from a key such as (seed, "diffusion", step, rank): every epoch, step and
    shard draws from its own stream, so a resumed run repeats an uninterrupted one."""
    return zlib.crc32(repr(key).encode())


def rng(*key):
    return torch.Generator().manual_seed(seed_of(*key))


def in_memory(dataset):
    return isinstance(dataset, lt_data.TensorImages) and dataset.transform is None


# ---- several processes: `torchrun --nproc_per_node N` starts N ranks, one per GPU. Each trains on
# its share of the data with its own noise; DDP averages the gradients; rank 0 writes the shared
# files.


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier():
    if world() > 1:
        dist.barrier()


def setup(cfg):
    """The device; under torchrun also the process group (NCCL on GPUs, gloo on CPU)."""
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available() or \
            cfg.device == "mps" and not torch.backends.mps.is_available():
        raise BadInput(f"--device {cfg.device} asked for, but it is not available")
    device = torch.device(cfg.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        # A long timeout: the other ranks wait while rank 0 alone filters or evaluates.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=2))
        if min(cfg.batch_size, cfg.diffusion_batch) < world():
            raise BadInput(f"--batch-size and --diffusion-batch must be at least the number of "
                           f"processes, {world()}")
    return device


def use_bf16(cfg, device):
    return cfg.precision == "bf16" or cfg.precision == "auto" and device.type == "cuda"


def autocast(device, bf16):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def place(model, cfg, device):
    """The model on the device; channels_last on CUDA with --channels-last (faster cuDNN)."""
    model.to(device)
    if cfg.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def for_training(model, cfg, device):
    """DDP under several processes, compiled with --compile; both share the model's weights."""
    if world() > 1:
        model = DDP(model, device_ids=[device] if device.type == "cuda" else None)
    return torch.compile(model) if cfg.compile else model


# ---- files: written to a temporary name and renamed; a stage's files live in <out>/<stage>/.


def atomic_write(path, write):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise


def save(path, **entries):
    if rank() == 0:
        atomic_write(path, lambda f: torch.save(entries, f))


def save_json(obj, path):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def load_checkpoint(path, keys=(), into=None):
    """torch.load; a missing, corrupt or foreign file, or a state that does not fit the modules
    `into` ({entry: module or optimizer}), is BadInput naming the file and the stage to redo."""
    into = into or {}
    redo = f"rerun with --redo {os.path.basename(os.path.dirname(os.path.abspath(path)))}"
    if not os.path.isfile(path):
        raise BadInput(f"checkpoint {path} is missing; {redo}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # pickle, zip and torch errors all mean the same here
        raise BadInput(f"checkpoint {path} is corrupt ({type(e).__name__}); {redo}") from None
    keys = (*into, *keys)
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in keys):
        raise BadInput(f"checkpoint {path} is not one of ours (expected "
                       f"{', '.join(map(repr, keys)) or 'a dict'}); {redo}")
    for key, target in into.items():
        try:
            target.load_state_dict(ckpt[key])
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
            detail = " ".join(str(e).split())[:160]
            raise BadInput(f"checkpoint {path}: {key!r} does not fit this run's model ({detail}); "
                           f"{redo}") from None
    return ckpt


def resume(path, into, counter, fresh):
    """The loop counter saved at `path`, with its states loaded `into` the modules; else fresh."""
    if not os.path.isfile(path):
        return fresh
    return load_checkpoint(path, (counter,), into)[counter]


def check_finite(loss, modules, what, when, ckpt_path):
    """A diverged loss or non-finite weights end the run (exit 1) before a checkpoint is written."""
    if not math.isfinite(loss):
        problem = f"loss became {loss}"
    elif not all(torch.isfinite(v).all() for m in modules for v in m.state_dict().values()
                 if v.is_floating_point()):
        problem = "the weights became non-finite"
    else:
        return
    raise FloatingPointError(f"{what}: {problem} by {when}; the last good checkpoint is kept at "
                             f"{ckpt_path}")


def read_done(cfg, stage):
    path = os.path.join(cfg.out, stage, "done.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        raise BadInput(f"{path} is unreadable; rerun with --redo {stage}") from None


def check_run_dir(cfg):
    """Write <out>/config.json, or check that the one there agrees with cfg in every field that
    changes results; --redo STAGE frees the fields only STAGE and later stages read, and clears
    those stages."""
    config, path = dataclasses.asdict(cfg), os.path.join(cfg.out, "config.json")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise BadInput(f"--out {cfg.out} is a file, not a directory; use another --out")
    if not os.path.isfile(path):
        if os.path.isdir(cfg.out) and os.listdir(cfg.out):
            raise BadInput(f"{cfg.out} is not empty and has no config.json; use another --out")
        return save_json(config, path)
    try:
        with open(path) as f:
            old = dict(json.load(f))
    except (OSError, ValueError, TypeError):
        raise BadInput(f"{path} is unreadable; delete the run directory or use another --out") \
            from None
    redone = STAGES[STAGES.index(cfg.redo):] if cfg.redo else []
    free = set(NOT_RESULTS).union(*(REDO_FIELDS.get(s, ()) for s in redone))
    diff = sorted(k for k in old.keys() | config.keys()
                  if k not in free and old.get(k) != config.get(k))
    if diff:
        raise BadInput(f"run directory {cfg.out} was made with another config ({diff[0]}: "
                       f"{old.get(diff[0])!r} there, {config.get(diff[0])!r} now, "
                       f"{len(diff)} field(s) in all); use another --out, delete it, or --redo "
                       f"the first stage that reads it")
    for stage in redone:
        shutil.rmtree(os.path.join(cfg.out, stage), ignore_errors=True)
    if redone:
        save_json(config, path)  # it describes every stage now


def load_data(cfg):
    """The dataset; under torchrun rank 0 reads (and downloads) it before the others."""
    if rank() > 0:
        barrier()
    data = lt_data.load_dataset(cfg.dataset, cfg.data_root, cfg.imb, cfg.seed, cfg.download)
    if rank() == 0:
        barrier()
    if cfg.eval_split == "val" and data.val is None:
        raise BadInput(f"{cfg.dataset} has no validation split here; use --eval-split test")
    return data


def run_stages(cfg, data, device):
    """Every stage of PIPELINE without a done.json (rank 0 alone runs those not in ALL_RANKS),
    then results.json from the evaluate stage's record, and its rows as a table."""
    if rank() == 0:
        check_run_dir(cfg)
    barrier()
    for name, fn in PIPELINE.items():
        if os.path.isfile(os.path.join(cfg.out, name, "done.json")):
            log(f"{name}: done, skipped")
            continue
        t0 = time.time()
        info = fn(cfg, data, device) if name in ALL_RANKS or rank() == 0 else {}
        barrier()
        if rank() == 0:
            save_json({**info, "seconds": time.time() - t0},
                      os.path.join(cfg.out, name, "done.json"))
        log(f"{name}: done in {time.time() - t0:.1f} s")
    if rank() > 0:
        return None
    evaluated = read_done(cfg, "evaluate")
    results = {"method": METHOD, "dataset": cfg.dataset, "imb": cfg.imb, "seed": cfg.seed,
               "train_counts": data.train_counts, "rows": evaluated["rows"],
               "generated": evaluated["generated"],
               "timing_s": {s: read_done(cfg, s)["seconds"] for s in PIPELINE},
               "config": dataclasses.asdict(cfg)}
    save_json(results, os.path.join(cfg.out, "results.json"))
    print(f"{'row':<14}{'overall':>8}{'many':>8}{'medium':>8}{'few':>8}")
    for name, r in results["rows"].items():
        cells = ("-" if r[k] is None else f"{r[k]:.2f}"
                 for k in ("overall", "many", "medium", "few"))
        print(f"{name:<14}" + "".join(f"{c:>8}" for c in cells))
    return results


def projection(t1, w1, t2, w2, full):
    """(work per second, seconds for `full` work) from two timed budgets: their difference cancels
    the fixed costs (building models, checkpoints); where noise swamps it, the larger run's mean."""
    rate = (w2 - w1) / (t2 - t1) if t2 > t1 and w2 > w1 else w2 / t2
    return rate, full / rate


def peak_memory(device):
    """Bytes: CUDA's peak allocation since the last reset, else the process's peak RSS so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource  # Unix; ru_maxrss is in KiB on Linux, in bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin"
                                                                 else 1024)


def estimate(cfg):
    """--estimate: every stage's own code run on a miniature of the configured run (random images
    of the dataset's shape, every class present, a temporary directory) at budgets n = 1, 2, 4, ...
    until the extra work takes 2 s, and projected to the configured budget with the real class
    counts. Writes nothing into --out."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise BadInput("--estimate runs in one process: start it with python, not torchrun")
    device = setup(cfg)
    classes = lt_data.SHAPES[cfg.dataset][1]
    data, counts = lt_data.random_data(cfg.dataset, cfg.imb, -(-2 * cfg.batch_size // classes))
    print(f"{METHOD} --estimate: {cfg.dataset} r={cfg.imb:g}, {sum(counts):,} training images, "
          f"on {device} ({torch.get_num_threads()} threads); timed on {len(data.train)} random "
          f"images, reading and decoding files not included")
    print(f"{'stage':<12}{'throughput':>26}{'projected':>16}{'peak memory':>14}")
    total = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in PIPELINE.items():
            timed, n = [], 1
            while len(timed) < 2 or timed[-1][0] - timed[0][0] < 2 and timed[-1][1] > timed[0][1] \
                    and n <= 64:
                changes, work, full, unit = probe(cfg, data, counts, name, n, device)
                small = dataclasses.replace(cfg, out=tmp, **changes)
                shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                with contextlib.redirect_stderr(io.StringIO()):  # the stages' progress bars
                    info = fn(small, data, device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                timed.append((time.perf_counter() - t0, work))
                save_json({**info, "seconds": 0.0}, os.path.join(tmp, name, "done.json"))
                n *= 2
            rate, seconds = projection(*timed[0], *timed[-1], full)
            total += seconds
            print(f"{name:<12}{rate:>14,.1f} {unit + '/s':<11}"
                  f"{str(datetime.timedelta(seconds=round(seconds))):>16}"
                  f"{peak_memory(device) / 2 ** 30:>10.2f} GiB")
    print(f"{'total':<12}{'':>26}{str(datetime.timedelta(seconds=round(total))):>16}")


def main(argv=None):
    """Exit codes: 0 done, 2 bad input (one line), 1 a diverged run (one line) or a bug."""
    try:
        cfg = parse_config(argv)
        if cfg.estimate:
            estimate(cfg)
        else:
            run(cfg)
    except (BadInput, FloatingPointError) as e:
        # A BadInput raised in a DataLoader worker arrives with the worker's traceback in its
        # message: its last line is the one to show.
        message = str(e).strip().splitlines()[-1].split("BadInput: ")[-1]
        if rank() == 0:
            print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
        return 2 if isinstance(e, BadInput) else 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
