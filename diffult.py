"""DiffuLT: class-conditional pixel-space diffusion for long-tailed recognition, in one file.

J. Shao et al., "DiffuLT: Diffusion for Long-tail Recognition Without External Knowledge",
NeurIPS 2024 (arXiv 2403.05170). No official code is public; the generator is the
Class-Balancing Diffusion Model of Y. Qin et al., CVPR 2023 (CBDM), on the DDPM of Ho et al. 2020.

  baseline    ResNet-32 with plain CE on the long-tailed set: the CE row and the feature extractor
              phi; class centres c_y and radii d_f(y) of the real training features
  diffusion   class-conditional DDPM UNet trained from scratch with the CBDM regulariser and the
              AID-biased loss L_AID through frozen phi (label dropout for classifier-free guidance)
  generate    every class topped up to N_t images with the EMA model (DDIM or CBDM's DDPM)
  filter      each sample is ID / AID / OOD by its phi-distance to its class centre; OOD dropped
  classifier  a fresh classifier on real + kept synthetic images, synthetic CE weighted by omega
  evaluate    rows CE, LA (post-hoc logit adjustment), DiffuLT, DiffuLT+LA

    python diffult.py                                    # digits, offline, 2 CPU cores, minutes
    python diffult.py --dataset cifar10 --imb 100        # downloads CIFAR-10 (GPU, about a day)
    torchrun --nproc_per_node 4 diffult.py --dataset cifar100 --imb 100   # 4 GPUs (DDP)

Measured on digits, r = 20, test top-1 %, mean of seeds 0, 1, 2 (overall / Few), with
DATASETS=digits RATIOS=20 SEEDS="0 1 2" bash run_all.sh (README):
    CE 92.42 / 85.00   LA 93.00 / 88.12   DiffuLT 96.67 / 92.71   DiffuLT+LA 96.58 / 93.33
Generated: 61.1 % ID, 33.5 % AID, 5.4 % OOD (dropped). One run takes 201 s on two idle CPU cores
(median of 3, /usr/bin/time, torch 2.14.1).
"""
import argparse
import contextlib
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

METHOD = "diffult"
STAGES = ["baseline", "diffusion", "generate", "filter", "classifier", "evaluate"]


# -------------------------------------------------------------------------------------------------
# Config: one field per flag (--unet-ch for unet_ch); DEFAULTS holds the per-dataset values.


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
    # ---- DiffuLT's generator (the pytorch-ddpm / CBDM CIFAR configuration unless noted)
    gen_size: int = opt(None, "image side the generator works at (CIFAR 32; imagenet_lt 64, "
                        "ours)")
    unet_ch: int = opt(None, "UNet base channels (CBDM: 128)")
    unet_mult: str = opt(None, "UNet channel multiplier per level (CBDM: 1,2,2,2)")
    unet_blocks: int = opt(None, "residual blocks per UNet level (CBDM: 2)")
    unet_attn: str = opt(None, "resolutions with self-attention, comma-separated (CBDM: 16)")
    unet_dropout: float = opt(0.1, "UNet dropout (CBDM: 0.1)")
    timesteps: int = opt(1000, "diffusion steps T (DDPM / CBDM: 1000)")
    diffusion_steps: int = opt(None, "diffusion training steps (CBDM: 300k on CIFAR-100-LT)")
    diffusion_batch: int = opt(None, "diffusion batch size, over all processes (CBDM: 48)")
    diffusion_lr: float = opt(None, "Adam learning rate of the denoiser (CBDM: 2e-4)")
    diffusion_warmup: int = opt(None, "linear learning-rate warm-up steps (CBDM: 5000)")
    ema_decay: float = opt(None, "EMA decay of the weights used for sampling (CBDM: 0.9999)")
    grad_clip: float = opt(1.0, "gradient-norm clip of the denoiser (CBDM: 1.0)")
    ckpt_every: int = opt(None, "diffusion checkpoint interval in steps")
    label_dropout: float = opt(0.1, "probability of the null label, for classifier-free guidance "
                               "(CBDM: 0.1)")
    cbdm_tau: float = opt(1.0, "CBDM regulariser weight tau (CBDM / DiffuLT: 1; 0 = plain DDPM)")
    cbdm_gamma: float = opt(0.25, "CBDM commitment weight gamma (CBDM: 0.25)")
    cbdm_prior: str = opt("uniform", "distribution of CBDM's target label y' (paper: uniform; "
                          "official code: empirical)", ("uniform", "empirical"))
    aid_alpha: float = opt(0.1, "weight alpha of the AID-biased loss L_AID (DiffuLT: 0.1; 0 = off)")
    # ---- DiffuLT: generation, filtering, retraining
    sampler: str = opt("ddim", "ddim (ours, fast) or ddpm (CBDM: all T ancestral steps)",
                       ("ddim", "ddpm"))
    sample_steps: int = opt(None, "DDIM steps (ours; --sampler ddpm takes all T)")
    eta: float = opt(0.0, "DDIM stochasticity eta (0 = deterministic DDIM)")
    guidance: float = opt(1.6, "classifier-free guidance w, eps = (1 + w) eps(y) - w eps(null) "
                          "(CBDM: 1.6; 0 = none)")
    target_count: int = opt(None, "N_t: every class is topped up to this many images "
                            "(paper: n_max, the head count)")
    gen_batch: int = opt(None, "images per generation shard (one shard = one saved file)")
    filter: bool = opt(True, "drop the OOD samples (paper); --no-filter keeps them (ablation)")
    synthetic_weight: float = opt(None, "CE weight omega of synthetic samples (paper: 0.3; 0.5 on "
                                  "ImageNet-LT)")


CIFAR = dict(imb=100, arch="resnet32", epochs=200, batch_size=128, lr=0.1, warmup_epochs=5,
             weight_decay=2e-4, gen_size=32, unet_ch=128, unet_mult="1,2,2,2", unet_blocks=2,
             unet_attn="16", diffusion_steps=300_000, diffusion_batch=48, diffusion_lr=2e-4,
             diffusion_warmup=5000, ema_decay=0.9999, ckpt_every=5000, sample_steps=100,
             gen_batch=500, synthetic_weight=0.3)
DEFAULTS = {
    # The papers' settings. Ours: CBDM's CIFAR-100-LT budget for CIFAR-10-LT too; 100 DDIM steps.
    "cifar10": CIFAR,
    "cifar100": CIFAR,
    # Ours, the papers do not give them: the usual ResNet-10 recipe (90 epochs, batch 256, wd
    # 5e-4), a 64x64 generator (upsampled for the classifier) with a wider 4-level UNet.
    "imagenet_lt": dict(CIFAR, imb=256, arch="resnet10", epochs=90, batch_size=256,
                        weight_decay=5e-4, gen_size=64, unet_mult="1,2,3,4", unet_attn="16,8",
                        diffusion_steps=500_000, diffusion_batch=128, synthetic_weight=0.5),
    # Ours: an 8x8 one-channel UNet, budgets for 2 CPU cores, and omega 0.1, the paper's other
    # value, ahead of its 0.3 on digits' validation split (README, "How the digits defaults were
    # chosen").
    "digits": dict(imb=20, arch="resnet32", epochs=60, batch_size=64, lr=0.05, warmup_epochs=5,
                   weight_decay=5e-4, gen_size=8, unet_ch=16, unet_mult="1,2", unet_blocks=1,
                   unet_attn="4", diffusion_steps=600, diffusion_batch=128, diffusion_lr=2e-3,
                   diffusion_warmup=50, ema_decay=0.99, ckpt_every=200, sample_steps=25,
                   gen_batch=256, synthetic_weight=0.1),
}
SMOKE = dict(epochs=2, unet_ch=16, unet_blocks=1, diffusion_steps=6, diffusion_batch=16,
             diffusion_warmup=2, ckpt_every=3, sample_steps=3, target_count=30, gen_batch=32)
# Fields that do not change what a run computes: a run directory may be reused with other values.
NOT_RESULTS = ("out", "device", "data_root", "download", "redo", "workers", "channels_last",
               "compile", "estimate")
# Fields no stage before the named one reads: `--redo STAGE` may change them in a finished run.
REDO_FIELDS = {"diffusion": ("gen_size", "unet_ch", "unet_mult", "unet_blocks", "unet_attn",
                             "unet_dropout", "timesteps", "diffusion_steps", "diffusion_batch",
                             "diffusion_lr", "diffusion_warmup", "ema_decay", "grad_clip",
                             "ckpt_every", "label_dropout", "cbdm_tau", "cbdm_gamma",
                             "cbdm_prior", "aid_alpha"),
               "generate": ("sampler", "sample_steps", "eta", "guidance", "target_count",
                            "gen_batch"),
               "filter": ("filter",), "classifier": ("synthetic_weight",),
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
# Generator: the class-conditional UNet of pytorch-ddpm / CBDM (Ho et al. 2020, App. B): residual
# blocks with a time + class embedding, self-attention at the listed resolutions, skip connections
# between mirrored levels. forward(x_t, t, y) -> predicted noise eps, the shape of x_t.


def group_norm(c):
    # 32 groups as in pytorch-ddpm (all its layers have >= 128 channels); in the narrow digits and
    # smoke nets, the most groups that still leave >= 4 channels a group (ours).
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if c % g == 0 and 4 * g <= max(4, c))
    return nn.GroupNorm(groups, c)


def timestep_embedding(t, dim):
    """Sinusoidal embedding of integer steps t (B,) -> (B, dim) (Vaswani et al. 2017, as in DDPM):
    [sin(t w_k), cos(t w_k)] with w_k = 10000^(-k / (dim / 2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection. q, k, v and
    the output projection are 1x1 convolutions, as in pytorch-ddpm."""

    def __init__(self, c):
        super().__init__()
        self.norm, self.qkv, self.proj = group_norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        # A 1x1 convolution is a linear map of each position's channels: applied as one to the
        # (B, 1 head, HW, C) rows, the 4-D shape scaled_dot_product_attention's fused kernels take.
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
    """Class-conditional epsilon-prediction UNet; label `num_classes` is the learned null class of
    classifier-free guidance (Ho & Salimans 2022). The CIFAR configuration (ch 128, ch_mult
    1,2,2,2, 2 blocks, attention at 16x16) has ~35.7 M parameters, as pytorch-ddpm's."""

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


def make_unet(cfg, data):
    return UNet(data.num_classes, data.channels, cfg.gen_size, cfg.unet_ch,
                tuple(int(m) for m in cfg.unet_mult.split(",")), cfg.unet_blocks,
                tuple(int(r) for r in cfg.unet_attn.split(",") if r), cfg.unet_dropout)


# -------------------------------------------------------------------------------------------------
# Diffusion math (Ho et al. 2020 = DDPM; Song et al. 2021 = DDIM). Step indices t are 0-based:
# index t is the paper's step t + 1, abar[t] = prod_{s <= t} (1 - beta_s), and "abar[-1]" = 1 is
# the clean data. Schedules are float64 CPU tensors; _at gathers them for a batch of indices.


def linear_schedule(T=1000, beta_1=1e-4, beta_T=0.02):
    """DDPM Sec. 4: betas linear from beta_1 to beta_T over T steps. Returns (betas, abar) in
    float64, checked here: 0 < beta < 1 and abar strictly decreasing and positive."""
    betas = torch.linspace(beta_1, beta_T, T, dtype=torch.float64)
    abar = torch.cumprod(1.0 - betas, dim=0)
    if not (((betas > 0) & (betas < 1)).all() and (abar[1:] < abar[:-1]).all() and abar[-1] > 0):
        raise BadInput(f"--timesteps {T}: the linear schedule's abar must stay positive and "
                       f"strictly decreasing in float64 (it underflows for T above ~75,000)")
    return betas, abar


def _at(values, t, x):
    """values[t] for a batch of indices t (or one int), shaped to broadcast against x."""
    v = values[t] if torch.is_tensor(t) else values[t].expand(x.shape[0])
    return v.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))


def q_sample(x0, t, noise, abar):
    """DDPM Eq. 4 in closed form: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, eps ~ N(0, I)."""
    return _at(abar.sqrt(), t, x0) * x0 + _at((1 - abar).sqrt(), t, x0) * noise


def predict_x0(x_t, t, eps, abar):
    """Eq. 4 solved for the clean image: x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    return (x_t - _at((1 - abar).sqrt(), t, x_t) * eps) / _at(abar.sqrt(), t, x_t)


def ddpm_step(x_t, t, eps, betas, abar, noise):
    """DDPM Algorithm 2, one step t -> t-1 (t an int), as pytorch-ddpm / CBDM sample: the mean of
    the posterior q(x_{t-1} | x_t, x0_hat) (DDPM Eq. 7) at the unclipped x0_hat,
        mean = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0_hat
               + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t,
    plus sqrt(beta_t) z (their 'fixedlarge' variance). No noise at the last step; only the final
    image is clipped to [-1, 1] (by the caller)."""
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    c0 = abar_prev.sqrt() * betas / (1 - abar)
    ct = (1 - betas).sqrt() * (1 - abar_prev) / (1 - abar)
    mean = _at(c0, t, x_t) * predict_x0(x_t, t, eps, abar) + _at(ct, t, x_t) * x_t
    return mean if t == 0 else mean + _at(betas, t, x_t).sqrt() * noise


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


def guided_eps(model, x_t, t, y, w, null_label):
    """Classifier-free guidance (Ho & Salimans 2022) in CBDM's convention, from one batched pass:
    eps = (1 + w) eps(x_t, y) - w eps(x_t, null); w = 0 is the plain conditional model. Both
    predictions are cast to fp32 before they are combined, so the combination adds no bf16 rounding
    of its own; under --precision bf16 the predictions still carry the network's bf16 rounding,
    which the combination amplifies about (1 + 2 w) = 4x (--precision fp32 avoids it)."""
    tt = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
    if w == 0:
        return model(x_t, tt, y).float()
    eps_c, eps_u = model(torch.cat([x_t, x_t]), torch.cat([tt, tt]),
                         torch.cat([y, torch.full_like(y, null_label)])).float().chunk(2)
    return (1 + w) * eps_c - w * eps_u


@torch.no_grad()
def sample(model, labels, cfg, shape, betas, abar, null_label, bf16=False):
    """One image per label, in [-1, 1], from the global RNG (seeded per shard by the caller).
    ddpm: all T ancestral steps (DDPM Algorithm 2); ddim: cfg.sample_steps evenly spaced steps
    from T - 1 down to 0 (DDIM Sec. 4.2 spaces them from 0; starting at T - 1 is ours), clipping
    x0_hat to the image range."""
    x = torch.randn(len(labels), *shape, device=labels.device)  # x_T ~ N(0, I)

    def eps(x, t):
        with torch.autocast(labels.device.type, dtype=torch.bfloat16, enabled=bf16):
            return guided_eps(model, x, t, labels, cfg.guidance, null_label)

    T = len(betas)
    if cfg.sampler == "ddpm":
        for t in range(T - 1, -1, -1):
            x = ddpm_step(x, t, eps(x, t), betas, abar, torch.randn_like(x) if t else None)
        return x.clamp(-1, 1)
    ts = torch.linspace(T - 1, 0, cfg.sample_steps, dtype=torch.float64).round().long().tolist()
    for i, t in enumerate(ts):
        a_prev = abar[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
        noise = torch.randn_like(x) if cfg.eta > 0 else None
        x = ddim_step(x, eps(x, t), abar[t].item(), a_prev, cfg.eta, noise, clip=(-1, 1))
    return x


# -------------------------------------------------------------------------------------------------
# Losses: CBDM's regulariser, DiffuLT's AID-biased loss (our reading) and its ID / AID / OOD rule.


def cbdm_loss(eps_y, eps_yp, t, T, tau=1.0, gamma=0.25):
    """CBDM regulariser (Qin et al. 2023, the official code's form), per sample (B,):
        tau * (t / T) * ( ||eps(x_t, y) - sg(eps(x_t, y'))||^2
                          + gamma * ||sg(eps(x_t, y)) - eps(x_t, y')||^2 )
    with sg = stop-gradient and ||.||^2 the mean over pixels (CBDM's F.mse_loss). The first term
    pulls the conditional prediction towards that for a class-balanced label y'; the commitment
    term moves the y' prediction back with gamma of the force. The differences are taken in fp32,
    adding no rounding of their own; at high t, where the weight t / T is largest, the two
    predictions nearly agree, and under --precision bf16 their difference is still partly the
    network's bf16 rounding. t are 0-based indices: t / T uses the paper's step t + 1 (CBDM's code
    uses t; the difference is <= 1 / T)."""
    eps_y, eps_yp = eps_y.float(), eps_yp.float()
    reg = (eps_y - eps_yp.detach()).square().flatten(1).mean(1)
    com = (eps_y.detach() - eps_yp).square().flatten(1).mean(1)
    return tau * (t.to(eps_y.device, torch.float32) + 1) / T * (reg + gamma * com)


def band(distance, radius):
    """DiffuLT's groups by the phi-distance d to the class centre and the class radius d_f:
    0 = ID (d <= d_f), 1 = AID (d_f < d <= 2 d_f), 2 = OOD (d > 2 d_f)."""
    return (distance > radius).long() + (distance > 2 * radius).long()


def aid_loss(feats, centres, radii, abar_t):
    """AID-biased loss, per sample (B,). THE FORMULA IS OURS: DiffuLT uses phi during diffusion
    training to favour AID samples by penalising ID and OOD ones, but its equation is not
    available to us. With feats = phi(x0_hat) of the model's clean-image estimate,
    r = ||feats - c_y|| / d_f(y) and
        L_AID = abar_t * ( relu(1 - r) + relu(r - 2) ):
    zero inside the AID band 1 <= r <= 2 and linear outside it; abar_t down-weights high noise
    levels, where x0_hat is a blur and its distance means little."""
    r = (feats.float() - centres).norm(dim=1) / radii
    return abar_t * (F.relu(1 - r) + F.relu(r - 2))


def weighted_ce(logits, y, w=None):
    """DiffuLT's classifier loss: mean_i w_i CE_i, w_i = 1 for real and omega for synthetic
    images (plain CE when w is None)."""
    loss = F.cross_entropy(logits, y, reduction="none")
    return (loss if w is None else loss * w).mean()


def training_prior(real_counts, kept_counts, omega):
    """The class prior of DiffuLT's training data for DiffuLT+LA (the row is ours): every synthetic
    image counts at its CE weight, n_c = real_c + omega * kept_c."""
    return [n + omega * k for n, k in zip(real_counts, kept_counts)]


# -------------------------------------------------------------------------------------------------
# Stage-1 recipe: CE with SGD, LDAM-DRW's schedule, random crop + flip on the device.


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


def train_classifier(model, dataset, data, cfg, device, ckpt_path, key, weights=None):
    """Train `model` on `dataset` with loss = mean_i w_i CE_i (w = 1 without weights), SGD with
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
    weights = None if weights is None else weights.to(device)
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
            with autocast(device, bf16):
                logits = net(x).float()
            w = None if weights is None else weights[idx.to(device)]
            loss = weighted_ce(logits, y.to(device), w)
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
# DiffuLT's stages. Each writes <out>/<stage>/ and returns the record that goes into done.json.


def to_unit(x):
    """uint8 [0, 255] -> float [-1, 1], the range the generator works in."""
    return x.float() / 127.5 - 1.0


def to_uint8(x):
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def resize(x, size):
    """Bilinear resize of float (B, C, H, W), antialiased when shrinking; a no-op at equal size
    (only imagenet_lt generates at another size than the classifier's input)."""
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=x.shape[-1] > size)


def phi_input(x, data):
    """Images in [-1, 1] at the generator's size -> the classifier's normalised input; the same as
    normalise() of the uint8 image, but differentiable, so L_AID's gradient flows through it."""
    mean = torch.tensor(data.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=x.device).view(1, -1, 1, 1)
    return (resize((x + 1) / 2, data.image_size) - mean) / std


def load_classifier(cfg, data, stage, device):
    """The classifier trained by `stage`, frozen, in eval mode (BatchNorm's running statistics)."""
    model = make_classifier(cfg.arch, data.num_classes, data.channels)
    load_checkpoint(os.path.join(cfg.out, stage, "ckpt.pt"), into={"model": model})
    return place(model, cfg, device).eval().requires_grad_(False)


def stage_baseline(cfg, data, device):
    """Stage 1: the CE classifier = the CE row and phi. Class centres c_y and radii d_f(y) of the
    real, un-augmented training features."""
    folder = os.path.join(cfg.out, "baseline")
    torch.manual_seed(seed_of(cfg.seed, "stage-1 init"))  # as ldmlr.py: one shared CE baseline
    model = make_classifier(cfg.arch, data.num_classes, data.channels)
    model = train_classifier(model, data.train, data, cfg, device,
                             os.path.join(folder, "ckpt.pt"), "stage-1")
    if rank() > 0:
        return {}
    _, feats = predict(model, data.train_plain, data, device, cfg.workers)
    labels = data.train.labels
    centres = torch.stack([feats[labels == c].mean(0) for c in range(data.num_classes)])
    # d_f(y) = the radius of the real class cloud: the largest distance of a real image of class y
    # to c_y. OURS: the paper's wording of d_f is not available to us (one secondary source reads
    # it as the largest distance between two real samples, about twice this).
    dist = (feats - centres[labels]).norm(dim=1)
    radii = torch.stack([dist[labels == c].max() for c in range(data.num_classes)])
    radii = torch.where(radii > 0, radii, radii[radii > 0].mean())  # a 1-image class (ours)
    save(os.path.join(folder, "stats.pt"), centres=centres, radii=radii, feats=feats,
         labels=labels)
    return {"mean_radius": radii.mean().item()}


def stage_diffusion(cfg, data, device):
    """Stage 2: the class-conditional DDPM, trained on
        L = L_simple + CBDM regulariser + alpha * L_AID        (per sample, then the batch mean)
    with L_simple = ||eps - eps_theta(x_t, t, y_in)||^2 (DDPM Eq. 14), y_in the label or, with
    probability label_dropout, the null class. Adam with linear warm-up, gradient clipping, EMA."""
    folder = os.path.join(cfg.out, "diffusion")
    ckpt_path = os.path.join(folder, "ckpt.pt")
    betas, abar = linear_schedule(cfg.timesteps)
    T, C = cfg.timesteps, data.num_classes
    torch.manual_seed(seed_of(cfg.seed, "diffusion init"))
    model = place(make_unet(cfg, data), cfg, device)
    ema = place(make_unet(cfg, data), cfg, device).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt_ = torch.optim.Adam(model.parameters(), lr=cfg.diffusion_lr)
    start = resume(ckpt_path, {"model": model, "ema": ema, "optimizer": opt_}, "step", 0)
    if start:
        log(f"diffusion: resuming at step {start}")
    # phi frozen (eval mode, no parameter gradients) but differentiable in its input: L_AID trains
    # the denoiser through it.
    phi = load_classifier(cfg, data, "baseline", device) if cfg.aid_alpha > 0 else None
    stats = load_checkpoint(os.path.join(cfg.out, "baseline", "stats.pt"), ("centres", "radii"))
    centres, radii = stats["centres"].to(device), stats["radii"].to(device)
    # CBDM's target label y': uniform over classes (the paper's balanced target) or the training
    # label frequencies (--cbdm-prior empirical, what the official code draws).
    prior = torch.ones(C) if cfg.cbdm_prior == "uniform" else torch.tensor(data.train_counts)
    prior = prior.float().to(device)
    flip = data.name != "digits"  # random horizontal flip, as pytorch-ddpm
    net, bf16 = for_training(model, cfg, device), use_bf16(cfg, device)
    bar = tqdm(range(start, cfg.diffusion_steps), "diffusion", initial=start,
               total=cfg.diffusion_steps, unit="step", disable=rank() > 0)
    terms, since, t0 = torch.zeros(3, device=device), 0, time.time()  # L_simple, CBDM, L_AID
    model.train()
    for step, (x, y) in zip(bar, diffusion_batches(data.train_plain, cfg, start, device)):
        torch.manual_seed(seed_of(cfg.seed, "diffusion", step, rank()))  # noise, labels, dropout
        x0 = to_unit(resize(x.to(device).float(), cfg.gen_size))  # (b, C, gen, gen) in [-1, 1]
        if flip:
            x0 = torch.where(torch.rand(len(x0), 1, 1, 1, device=device) < 0.5, x0.flip(3), x0)
        y = y.to(device)
        t = torch.randint(T, (len(x0),), device=device)  # 0-based indices, uniform over the T steps
        noise = torch.randn_like(x0)
        kept = torch.rand(len(x0), device=device) >= cfg.label_dropout
        y_in = torch.where(kept, y, C)  # label C is the null class
        for g in opt_.param_groups:  # linear warm-up, then constant (pytorch-ddpm / CBDM)
            g["lr"] = cfg.diffusion_lr * min(1.0, (step + 1) / cfg.diffusion_warmup)

        x_t = q_sample(x0, t, noise, abar)
        with autocast(device, bf16):  # the losses in fp32
            eps = net(x_t, t, y_in).float()
            simple = (eps - noise).square().flatten(1).mean(1)  # (b,)
            # CBDM and L_AID act on the samples that kept their label (ours: CBDM's code drops
            # the labels of a whole batch at once and skips the regulariser for that batch).
            cbdm = torch.zeros_like(simple)
            if cfg.cbdm_tau > 0:
                y_bal = torch.multinomial(prior, len(x0), replacement=True)
                cbdm = kept * cbdm_loss(eps, net(x_t, t, y_bal), t, T, cfg.cbdm_tau,
                                        cfg.cbdm_gamma)
            aid = torch.zeros_like(simple)
            if cfg.aid_alpha > 0:
                feats = phi.features(phi_input(predict_x0(x_t, t, eps, abar), data))
                aid = kept * aid_loss(feats, centres[y], radii[y], _at(abar, t, simple).float())
        loss = (simple + cbdm + cfg.aid_alpha * aid).mean()
        opt_.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt_.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - cfg.ema_decay)
        terms += torch.stack([simple.mean(), cbdm.mean(), aid.mean()]).detach()
        since, done = since + 1, step + 1
        if done % 50 == 0 or done % cfg.ckpt_every == 0 or done == cfg.diffusion_steps:
            means = (terms / since).tolist()  # the one host-device sync of an interval
            check_finite(sum(means), [], "diffusion", f"step {done}", ckpt_path)
            speed = since * len(x0) / (time.time() - t0)
            bar.set_postfix(simple=f"{means[0]:.4f}", cbdm=f"{means[1]:.4f}",
                            aid=f"{means[2]:.4f}", img_s=f"{speed:.0f}")
            terms.zero_()
            since, t0 = 0, time.time()
        if done % cfg.ckpt_every == 0 or done == cfg.diffusion_steps:
            check_finite(0.0, [model, ema], "diffusion", f"step {done}", ckpt_path)
            save(ckpt_path, model=model.state_dict(), ema=ema.state_dict(),
                 optimizer=opt_.state_dict(), step=done, config=dataclasses.asdict(cfg))
    if start == cfg.diffusion_steps:
        return {"steps": cfg.diffusion_steps}
    # Running means of the last log interval: L_simple, the CBDM term as it enters the loss, and
    # L_AID before its weight alpha.
    return {"steps": cfg.diffusion_steps, "loss_simple": means[0], "loss_cbdm": means[1],
            "loss_aid": means[2], "parameters": sum(p.numel() for p in model.parameters())}


def diffusion_batches(dataset, cfg, start, device):
    """Per step from `start` on, this rank's batch of (uint8 images, labels), drawn with
    replacement by a generator seeded with (seed, step, rank) (ours; pytorch-ddpm shuffles
    epochs), so a resumed run reads what an uninterrupted one reads."""
    b = cfg.diffusion_batch // world()
    steps = range(start, cfg.diffusion_steps)
    draws = (torch.randint(len(dataset), (b,), generator=rng(cfg.seed, "batch", s, rank()))
             for s in steps)
    if in_memory(dataset):
        images, labels = dataset.images.to(device), dataset.labels.to(device)
        return ((images[i.to(device)], labels[i.to(device)]) for i in draws)
    return torch.utils.data.DataLoader(dataset, batch_sampler=(i.tolist() for i in draws),
                                       num_workers=cfg.workers)


def generation_plan(counts, target, shard_size):
    """Labels to generate: target - n_c of every class below the target, in shards."""
    labels = torch.cat([torch.full((max(0, target - n),), c, dtype=torch.long)
                        for c, n in enumerate(counts)])
    return list(labels.split(shard_size))


def stage_generate(cfg, data, device):
    """Stage 3: every class topped up to N_t by the EMA generator with guidance, shard by shard.
    Shard i comes from rank i % world and a generator seeded by (seed, i), and is saved atomically
    as uint8: a rerun after an interruption generates only the missing shards, the same images."""
    folder = os.path.join(cfg.out, "generate")
    betas, abar = linear_schedule(cfg.timesteps)
    ema = make_unet(cfg, data)
    load_checkpoint(os.path.join(cfg.out, "diffusion", "ckpt.pt"), into={"ema": ema})
    place(ema, cfg, device).eval()
    plan = generation_plan(data.train_counts, cfg.target_count, cfg.gen_batch)
    path = [os.path.join(folder, f"shard_{i:05d}.pt") for i in range(len(plan))]
    saved = sum(os.path.isfile(p) for p in path)
    if saved:
        log(f"generate: {saved} of {len(plan)} shards already saved, resuming")
    todo = [i for i in range(rank(), len(plan), world()) if not os.path.isfile(path[i])]
    steps = cfg.timesteps if cfg.sampler == "ddpm" else cfg.sample_steps
    bar = tqdm(todo, f"generate ({cfg.sampler}, {steps} steps)", unit="shard", disable=rank() > 0)
    for i in bar:
        torch.manual_seed(seed_of(cfg.seed, "generate", i))
        x = sample(ema, plan[i].to(device), cfg, (data.channels, cfg.gen_size, cfg.gen_size),
                   betas, abar, data.num_classes, use_bf16(cfg, device))
        shard = {"images": to_uint8(x).cpu(), "labels": plan[i]}
        atomic_write(path[i], lambda f: torch.save(shard, f))  # by this rank, not rank 0
    return {"target_count": cfg.target_count, "shards": len(plan),
            "images": sum(len(p) for p in plan), "sampler": cfg.sampler, "steps": steps}


def load_generated(cfg, data):
    """Every generated image and label, shard by shard, each checked against the generation plan:
    a shard of another shape, dtype or labels (another run's, say) is BadInput here."""
    plan = generation_plan(data.train_counts, cfg.target_count, cfg.gen_batch)
    shape = (data.channels, cfg.gen_size, cfg.gen_size)
    images = [torch.zeros(0, *shape, dtype=torch.uint8)]
    for i, planned in enumerate(plan):
        path = os.path.join(cfg.out, "generate", f"shard_{i:05d}.pt")
        shard = load_checkpoint(path, ("images", "labels"))
        x, y = shard["images"], shard["labels"]
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.shape[1:] == shape
                and len(x) == len(planned)):
            problem = (f"images {getattr(x, 'dtype', type(x).__name__)} "
                       f"{tuple(getattr(x, 'shape', ()))}, this run generates uint8 "
                       f"{(len(planned), *shape)}")
        elif not (torch.is_tensor(y) and y.dtype == torch.long and y.shape == planned.shape):
            problem = f"labels that are not {len(planned)} int64 class indices"
        elif ((y < 0) | (y >= data.num_classes)).any():
            problem = f"labels outside 0..{data.num_classes - 1}"
        elif not torch.equal(y, planned):
            problem = "other labels than this run's generation plan"
        else:
            images.append(x)
            continue
        raise BadInput(f"{path} holds {problem}; rerun with --redo generate")
    return torch.cat(images), torch.cat([torch.zeros(0, dtype=torch.long), *plan])


def save_samples_png(images, groups, path, per_row=10):
    """samples.png: one row each of ID, AID and OOD samples (blank where a group has fewer),
    spread over the group so that several classes show; small images upscaled for viewing."""
    rows = []
    for g in range(3):
        members = torch.nonzero(groups == g).flatten()
        pick = members[torch.linspace(0, len(members) - 1, min(per_row, len(members))).long()]
        row = images[pick].float() / 255
        rows += [*row, *torch.ones(per_row - len(row), *images.shape[1:])]
    grid = torchvision.utils.make_grid(torch.stack(rows), nrow=per_row, pad_value=0.5)
    grid = F.interpolate(grid[None], scale_factor=max(1, 32 // images.shape[-1]))[0]
    tmp = path + ".tmp.png"
    torchvision.utils.save_image(grid, tmp)
    os.replace(tmp, path)


def stage_filter(cfg, data, device):
    """Stage 4: ID / AID / OOD by the phi-distance to the class centre (band()); OOD dropped unless
    --no-filter. Fractions, kept counts, distances and Frechet distances go to "generated"."""
    images, labels = load_generated(cfg, data)
    phi = load_classifier(cfg, data, "baseline", device)
    stats = load_checkpoint(os.path.join(cfg.out, "baseline", "stats.pt"),
                            ("centres", "radii", "feats", "labels"))
    with torch.no_grad():
        feats = torch.cat([torch.zeros(0, stats["feats"].shape[1])] + [
            phi.features(phi_input(to_unit(x.to(device)), data)).float().cpu()
            for x in images.split(512)])
    dist = (feats - stats["centres"][labels]).norm(dim=1)
    over_radius = dist / stats["radii"][labels]
    groups = band(dist, stats["radii"][labels])
    keep = groups < 2 if cfg.filter else torch.ones_like(groups, dtype=torch.bool)
    save(os.path.join(cfg.out, "filter", "kept.pt"), images=images[keep], labels=labels[keep])
    save_samples_png(images, groups, os.path.join(cfg.out, "samples.png"))
    C, names = data.num_classes, ("id", "aid", "ood")
    per_class = torch.bincount(labels, minlength=C)
    real_f, real_y = stats["feats"], stats["labels"]
    fractions, mean_distance, mean_over_radius, frechet = {}, {}, {}, {}
    for g, name in enumerate(names):
        in_g = groups == g
        fractions[name] = in_g.double().mean().item() if len(groups) else None
        n_g = torch.bincount(labels[in_g], minlength=C)
        fractions[f"{name}_per_class"] = [n / m if m else None for n, m in
                                          zip(n_g.tolist(), per_class.tolist())]
        mean_distance[name] = dist[in_g].mean().item() if in_g.any() else None
        mean_over_radius[name] = over_radius[in_g].mean().item() if in_g.any() else None
        frechet[name] = lt_data.frechet_or_none(real_f, feats[in_g])
    frechet["overall"] = lt_data.frechet_or_none(real_f, feats)
    frechet["per_class"] = [lt_data.frechet_or_none(real_f[real_y == c], feats[labels == c])
                            for c in range(C)]
    return {"counts": per_class.tolist(), "target_count": cfg.target_count,
            "fractions": fractions, "kept": int(keep.sum()),
            "kept_per_class": torch.bincount(labels[keep], minlength=C).tolist(),
            "filtered": cfg.filter, "mean_distance": mean_distance,
            "mean_distance_over_radius": mean_over_radius, "frechet": frechet}


def stage_classifier(cfg, data, device):
    """Stage 5: a fresh classifier on real + kept synthetic images, the stage-1 recipe with
    weighted CE: loss = mean_i w_i CE_i, w_i = 1 for real and omega for synthetic images."""
    kept = load_checkpoint(os.path.join(cfg.out, "filter", "kept.pt"), ("images", "labels"))
    real, fake = data.train, lt_data.TensorImages(kept["images"], kept["labels"])
    if in_memory(real):  # CIFAR, digits: samples of another --gen-size are resized once
        images = to_uint8(resize(to_unit(fake.images), data.image_size))
        dataset = lt_data.TensorImages(torch.cat([real.images, images]),
                                       torch.cat([real.labels, fake.labels]))
    else:  # ImageNet-LT: the 64x64 samples get the real images' training transform
        fake.transform = lt_data.train_transform(data.image_size)
        dataset = torch.utils.data.ConcatDataset([real, fake])
    weights = torch.cat([torch.ones(len(real)), torch.full((len(fake),), cfg.synthetic_weight)])
    torch.manual_seed(seed_of(cfg.seed, "classifier init"))
    model = make_classifier(cfg.arch, data.num_classes, data.channels)
    train_classifier(model, dataset, data, cfg, device,
                     os.path.join(cfg.out, "classifier", "ckpt.pt"), "DiffuLT classifier", weights)
    return {"real": len(real), "synthetic": len(fake), "synthetic_weight": cfg.synthetic_weight}


def stage_evaluate(cfg, data, device):
    """Stage 6: CE and LA (post-hoc logit adjustment with the real prior) of the stage-1 model;
    DiffuLT and DiffuLT+LA of the stage-5 model, whose prior counts each synthetic image at its
    CE weight: n_c = real_c + omega * kept_c."""
    split = data.val if cfg.eval_split == "val" else data.test
    generated = read_done(cfg, "filter")
    prior = training_prior(data.train_counts, generated["kept_per_class"], cfg.synthetic_weight)
    rows = {}
    for stage, name, la_name, counts in (("baseline", "CE", "LA", data.train_counts),
                                         ("classifier", "DiffuLT", "DiffuLT+LA", prior)):
        logits, _ = predict(load_classifier(cfg, data, stage, device), split, data, device,
                            cfg.workers)
        adjusted = lt_data.logit_adjust(logits, counts, cfg.la_tau)
        for row, scores in ((name, logits), (la_name, adjusted)):
            rows[row] = lt_data.accuracy_report(scores.argmax(1), split.labels, data.train_counts)
    del generated["seconds"]
    return {"rows": rows, "generated": generated}


PIPELINE = {"baseline": stage_baseline, "diffusion": stage_diffusion, "generate": stage_generate,
            "filter": stage_filter, "classifier": stage_classifier, "evaluate": stage_evaluate}
ALL_RANKS = ("baseline", "diffusion", "generate", "classifier")  # the others: rank 0 alone


def run(cfg):
    """Every stage that is not done yet, then results.json and the table."""
    device = setup(cfg)
    data = load_data(cfg)
    cfg.target_count = cfg.target_count or data.n_max
    return run_stages(cfg, data, device)


# =================================================================================================
# Plumbing a reader of the paper may skip: flags, several processes, files and stages, main.


# The range of every numeric flag (parse_config also checks that floats are finite).
RULES = {
    **dict.fromkeys(("epochs", "batch_size", "lr", "timesteps", "diffusion_steps",
                     "diffusion_batch", "diffusion_lr", "diffusion_warmup", "ckpt_every",
                     "sample_steps", "gen_batch", "gen_size", "unet_ch", "unet_blocks",
                     "grad_clip", "synthetic_weight"), (lambda v: v > 0, "> 0")),
    **dict.fromkeys(("warmup_epochs", "weight_decay", "workers", "cbdm_tau", "cbdm_gamma",
                     "aid_alpha", "guidance", "la_tau"), (lambda v: v >= 0, ">= 0")),
    **dict.fromkeys(("unet_dropout", "label_dropout", "ema_decay"),
                    (lambda v: 0 <= v < 1, "in [0, 1)")),
    "target_count": (lambda v: v is None or v > 0, "> 0"),
    "eta": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "seed": (lambda v: 0 <= v < 2 ** 32, "in 0 .. 2^32 - 1"),
    "imb": (lambda v: v >= 1, ">= 1 (head / tail)"),
}


def validate(cfg):
    """What RULES cannot say: how flags constrain each other, and the UNet's shape."""
    if cfg.sample_steps > cfg.timesteps:
        raise BadInput(f"--sample-steps must be <= --timesteps ({cfg.timesteps})")
    if cfg.guidance > 0 and cfg.label_dropout == 0:
        raise BadInput("--guidance > 0 needs --label-dropout > 0 (the null label must be trained)")
    if cfg.unet_ch % 2:
        raise BadInput(f"--unet-ch must be even (the sin / cos time embedding), got {cfg.unet_ch}")
    linear_schedule(cfg.timesteps)  # a T so large that abar underflows is refused here
    try:
        mult = [int(m) for m in cfg.unet_mult.split(",")]
        [int(r) for r in cfg.unet_attn.split(",") if r]
    except ValueError:
        raise BadInput(f"--unet-mult and --unet-attn take comma-separated integers, got "
                       f"{cfg.unet_mult!r} and {cfg.unet_attn!r}") from None
    if min(mult) < 1 or cfg.gen_size % 2 ** (len(mult) - 1):
        raise BadInput(f"--gen-size {cfg.gen_size} must be divisible by 2^(levels - 1) for "
                       f"--unet-mult {cfg.unet_mult}")


def probe(cfg, data, counts, stage, n, device):
    """--estimate's budget n (1, 2, 4, ...) of `stage` on the miniature `data`: (config changes,
    work done at that budget, work of the configured run on the real class counts, unit). On
    a CPU, the generators of 32x32 and larger images train on batches of 16 and sample shards of
    64 here (per-image rates, a slight overestimate; ours), to keep the estimate short."""
    M, C, N = len(data.train), data.num_classes, sum(counts)
    cpu_cap = device.type != "cuda" and cfg.gen_size >= 32
    b = min(cfg.diffusion_batch, 16) if cpu_cap else cfg.diffusion_batch
    g = min(cfg.gen_batch, 64) if cpu_cap else cfg.gen_batch
    small = C * -(-g // C)  # images the miniature generates: every class topped up by g / C
    made = sum(max(0, (cfg.target_count or max(counts)) - c) for c in counts)
    steps = cfg.timesteps if cfg.sampler == "ddpm" else cfg.sample_steps
    # The miniature keeps every sample (no filter), so the classifier's work is M + small images
    # a epoch; the configured run's counts every generated image too (an upper bound).
    common = {"diffusion_batch": b, "gen_batch": g, "sampler": "ddim", "filter": False,
              "target_count": max(data.train_counts) + small // C}
    work = {"baseline": ({"epochs": n}, n * M, cfg.epochs * N, "img"),
            "diffusion": ({"diffusion_steps": n}, n * b, cfg.diffusion_steps * cfg.diffusion_batch,
                          "img"),
            "generate": ({"sample_steps": n}, n * small, made * steps, "img-step"),
            "filter": ({}, small, made, "img"),
            "classifier": ({"epochs": n}, n * (M + small), cfg.epochs * (N + made), "img"),
            "evaluate": ({}, 2 * M, 2 * lt_data.SHAPES[cfg.dataset][4], "img")}
    changes, done, full, unit = work[stage]
    return {**common, **changes}, done, full, unit


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
