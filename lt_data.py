"""Long-tailed benchmarks shared by diffult.py and ldmlr.py.

Data, long-tail profiles, Many/Medium/Few splits and evaluation; no training logic.

    CIFAR-10-LT / CIFAR-100-LT   exponential profile of Cao et al. 2019 (LDAM-DRW)
    ImageNet-LT                  the fixed split of Liu et al. 2019, read from its list files
    digits                       scikit-learn's bundled UCI digits made long-tailed: fully offline

Every dataset comes back as uint8 image tensors (C, H, W) plus integer labels, so both scripts
augment and normalise batches on the device in the same way whatever the source.
"""
import hashlib
import json
import math
import os
import pickle
import random
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset


class BadInput(Exception):
    """A problem with the user's input or data. The scripts print its one-line message and exit 2."""


# The optimisers scale an update by lr (SGD) or by up to lr / (1 - beta_1) = 10 lr (Adam's first
# step), a number torch applies as a float32: a larger learning rate cannot even be applied.
SGD_LR_MAX = torch.finfo(torch.float32).max
ADAM_LR_MAX = SGD_LR_MAX * (1 - 0.9)


# -------------------------------------------------------------------------------------------------
# Long-tail profiles


def lt_counts(n_max, num_classes, imb, profile="exp"):
    """Per-class training counts, class 0 the head.

    exp:  n_i = floor(n_max * (1/imb) ** (i / (C - 1)))   (Cao et al. 2019, the LDAM-DRW convention)
    step: the first half of the classes keep n_max, the rest floor(n_max / imb)
    """
    if not imb >= 1:
        raise BadInput(f"imbalance ratio must be >= 1 (head/tail), got {imb}")
    if num_classes < 1 or n_max < 1:
        raise BadInput(f"need n_max >= 1 and num_classes >= 1, got {n_max}, {num_classes}")
    if profile == "exp":
        if num_classes == 1:
            return [int(n_max)]
        # n_max / imb**e rather than the reference code's n_max * (1/imb)**e, and a relative
        # 1e-12 added before the floor: the same counts on every published setting, and a count
        # that is an integer in exact arithmetic is not lost to rounding (in floating point
        # 98 * (1/49) is 1.999..., and 8 / 1.6 could come out just below 5).
        return [max(1, int(math.floor(n_max / imb ** (i / (num_classes - 1.0)) * (1 + 1e-12))))
                for i in range(num_classes)]
    if profile == "step":
        head = num_classes // 2
        tail = max(1, int(math.floor(n_max / imb * (1 + 1e-12))))
        return [int(n_max)] * head + [tail] * (num_classes - head)
    raise BadInput(f"unknown long-tail profile {profile!r}; use 'exp' or 'step'")


def make_lt_indices(targets, counts, seed):
    """Indices of a long-tailed subset: class c keeps counts[c] of its samples, drawn uniformly.

    The draw uses its own numpy Generator seeded with `seed`; the global RNGs are not touched.
    Returns a sorted int64 array.
    """
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    keep = []
    for c, n in enumerate(counts):
        idx = np.flatnonzero(targets == c)
        if len(idx) < n:
            raise BadInput(f"class {c} has {len(idx)} samples, the profile asks for {n}")
        keep.append(rng.choice(idx, size=n, replace=False))
    return np.sort(np.concatenate(keep)).astype(np.int64) if keep else np.zeros(0, np.int64)


def shot_groups(counts, many=100, few=20):
    """Many (> many), Medium and Few (< few) class lists (Kang et al. 2020 thresholds)."""
    groups = {"many": [], "medium": [], "few": []}
    for c, n in enumerate(counts):
        groups["many" if n > many else "few" if n < few else "medium"].append(c)
    return groups


# -------------------------------------------------------------------------------------------------
# Datasets: uint8 tensors (C, H, W) and int64 labels


class TensorImages(Dataset):
    """Images held in memory as one uint8 tensor (N, C, H, W)."""

    def __init__(self, images, labels):
        self.images = torch.as_tensor(images, dtype=torch.uint8)
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        assert self.images.ndim == 4 and len(self.images) == len(self.labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


class ImageList(Dataset):
    """Images read lazily from an ImageNet-LT list file: resize the short side, centre-crop."""

    def __init__(self, root, paths, labels, image_size):
        self.root, self.paths, self.image_size = root, list(paths), image_size
        self.labels = torch.as_tensor(labels, dtype=torch.int64)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image
        path = os.path.join(self.root, self.paths[i])
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
        except (OSError, ValueError) as e:
            raise BadInput(f"cannot read image {path}: {e}") from None
        s, short = self.image_size, round(self.image_size * 256 / 224)  # the usual 256 -> 224
        scale = short / min(im.size)
        w, h = max(short, round(im.width * scale)), max(short, round(im.height * scale))
        im = im.resize((w, h), Image.BILINEAR)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s))
        return torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous(), self.labels[i]


@dataclass
class LTData:
    """What load_dataset returns: the splits and what a model needs to know about them."""
    name: str
    train: Dataset            # long-tailed training set
    val: Optional[Dataset]    # balanced validation split carved from training data, or None
    test: Dataset             # balanced test set
    train_counts: list        # images per class in `train`
    num_classes: int
    channels: int
    image_size: int
    mean: tuple               # per-channel normalisation of images scaled to [0, 1]
    std: tuple
    n_max: int                # head-class count of the profile


CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# digits: 8x8 grey, 1797 images. Fixed (seed-independent) balanced test and validation splits are
# held out first; the long-tailed training set is drawn from what is left (>= 114 per class).
DIGITS = dict(test_per_class=40, val_per_class=20, n_max=110, mean=(0.3053,), std=(0.3760,))
DATASETS = ("cifar10", "cifar100", "imagenet_lt", "digits")


def load_dataset(name, root="./data", imb=100, seed=0, download=False, profile="exp",
                 image_size=224, n_max=None):
    """The long-tailed training set, the balanced test set and the facts about them (LTData).

    imb is ignored for imagenet_lt, whose split is fixed; image_size is used by imagenet_lt only.
    n_max overrides the head count of CIFAR (5000 / 500) or digits (110), e.g. for small files.
    Raises BadInput for an unknown name, a bad ratio or missing / malformed data.
    """
    if name not in DATASETS:
        raise BadInput(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "imagenet_lt":
        return _load_imagenet_lt(root, image_size)
    if not imb >= 1:
        raise BadInput(f"--imb must be >= 1 (head/tail ratio), got {imb}")
    if name == "digits":
        return _load_digits(imb, seed, profile, n_max or DIGITS["n_max"])
    return _load_cifar(name, root, imb, seed, download, profile, n_max)


# The official python-version archives (https://www.cs.toronto.edu/~kriz/cifar.html): where each
# comes from, its md5, the folder it unpacks to, its train / test pickles and their label key.
CIFAR = {
    "cifar10": dict(url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    md5="c58f30108f718f92721af3b95e74349a", folder="cifar-10-batches-py",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                    key="labels", num_classes=10, n_max=5000),
    "cifar100": dict(url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                     md5="eb9058c3a382ffc7106e4002c42a8d85", folder="cifar-100-python",
                     train=["train"], test=["test"], key="fine_labels", num_classes=100,
                     n_max=500),
}


def _download_cifar(spec, root):
    """Fetch the official archive, check its md5 and unpack it into root (standard library only).
    The archive is written under a temporary name and renamed once complete."""
    os.makedirs(root, exist_ok=True)
    archive = os.path.join(root, os.path.basename(spec["url"]))
    if not os.path.isfile(archive):
        print(f"downloading {spec['url']} to {archive}", file=sys.stderr, flush=True)
        try:
            with urllib.request.urlopen(spec["url"]) as r:
                atomic_write(archive, lambda f: shutil.copyfileobj(r, f))
        except OSError as e:
            raise BadInput(f"could not download {spec['url']} into {root}: {e}") from None
    md5 = hashlib.md5()
    with open(archive, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            md5.update(block)
    if md5.hexdigest() != spec["md5"]:
        raise BadInput(f"{archive} has md5 {md5.hexdigest()}, the official archive has "
                       f"{spec['md5']}; delete it and rerun with --download")
    with tarfile.open(archive) as tar:  # the "data" filter refuses paths outside root
        if hasattr(tarfile, "data_filter"):
            tar.extractall(root, filter="data")
        else:
            tar.extractall(root)


def _read_cifar_split(folder, files, key, num_classes):
    """Images (N, 3, 32, 32) uint8 and labels (N,) from the pickled batches: each row of "data" is
    the 1024 red, then 1024 green, then 1024 blue values of one image, row-major."""
    images, labels = [], []
    for name in files:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="latin1")  # the files are Python 2 pickles
            d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
            x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(d[key], dtype=np.int64)
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, KeyError, TypeError,
                ValueError) as e:
            raise BadInput(f"{path} is missing or not a CIFAR batch ({type(e).__name__}: {e}); "
                           f"rerun with --download, or extract the official python-version "
                           f"archive into {os.path.dirname(folder)}") from None
        if len(x) != len(y) or (len(y) and not 0 <= y.min() <= y.max() < num_classes):
            raise BadInput(f"{path}: {len(x)} images, {len(y)} labels, labels must lie in "
                           f"0..{num_classes - 1}; the file is not an official CIFAR batch")
        images.append(x)
        labels.append(y)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def _load_cifar(name, root, imb, seed, download, profile, n_max=None):
    spec = CIFAR[name]
    folder = os.path.join(root, spec["folder"])
    if download and not all(os.path.isfile(os.path.join(folder, f))
                            for f in spec["train"] + spec["test"]):
        _download_cifar(spec, root)
    train_x, train_y = _read_cifar_split(folder, spec["train"], spec["key"], spec["num_classes"])
    test_x, test_y = _read_cifar_split(folder, spec["test"], spec["key"], spec["num_classes"])
    n_max = n_max or spec["n_max"]
    counts = lt_counts(n_max, spec["num_classes"], imb, profile)
    keep = torch.from_numpy(make_lt_indices(train_y.numpy(), counts, seed))
    mean, std = CIFAR_STATS[name]
    return LTData(name, TensorImages(train_x[keep], train_y[keep]), None,
                  TensorImages(test_x, test_y), counts, spec["num_classes"], 3, 32, mean, std,
                  n_max)


def _read_list(path, root, num_classes=1000):
    """Parse an ImageNet-LT list file: one `relative/path.JPEG label` per line."""
    if not os.path.isfile(path):
        raise BadInput(f"ImageNet-LT list file {path} not found; put ImageNet_LT_train.txt and "
                       f"ImageNet_LT_test.txt (Liu et al. 2019) in the ImageNet root {root}")
    paths, labels = [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise BadInput(f"{path} line {lineno}: expected 'relative/path.JPEG label', "
                               f"got {line.strip()!r}")
            label = int(parts[1])
            if not 0 <= label < num_classes:
                raise BadInput(f"{path} line {lineno}: label {label} outside 0..{num_classes - 1}")
            if not os.path.isfile(os.path.join(root, parts[0])):
                raise BadInput(f"{path} line {lineno}: image {os.path.join(root, parts[0])} "
                               f"not found")
            paths.append(parts[0])
            labels.append(label)
    if not paths:
        raise BadInput(f"{path} lists no images")
    return paths, labels


def _load_imagenet_lt(root, image_size):
    train = _read_list(os.path.join(root, "ImageNet_LT_train.txt"), root)
    test = _read_list(os.path.join(root, "ImageNet_LT_test.txt"), root)
    num_classes = 1000
    counts = np.bincount(train[1], minlength=num_classes).tolist()
    val_file = os.path.join(root, "ImageNet_LT_val.txt")  # the official 20-per-class val split
    val = ImageList(root, *_read_list(val_file, root), image_size) if os.path.isfile(val_file) \
        else None
    return LTData("imagenet_lt", ImageList(root, *train, image_size), val,
                  ImageList(root, *test, image_size), counts, num_classes, 3, image_size,
                  *IMAGENET_STATS, max(counts))


def _load_digits(imb, seed, profile, n_max):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8))[:, None]  # (N,1,8,8)
    y = d.target.astype(np.int64)
    # Test and validation splits are drawn with a fixed generator, independent of --seed, so
    # every seed is evaluated on the same images.
    rng = np.random.default_rng(12345)
    test_idx, val_idx, pool_idx = [], [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        t, v = DIGITS["test_per_class"], DIGITS["val_per_class"]
        test_idx.append(idx[:t])
        val_idx.append(idx[t:t + v])
        pool_idx.append(idx[t + v:])
    pool = np.sort(np.concatenate(pool_idx))
    counts = lt_counts(n_max, 10, imb, profile)
    keep = pool[make_lt_indices(y[pool], counts, seed)]

    def part(idx):
        idx = torch.from_numpy(np.sort(np.concatenate(idx)) if isinstance(idx, list) else idx)
        return TensorImages(x[idx], torch.from_numpy(y)[idx])

    return LTData("digits", part(keep), part(val_idx), part(test_idx), counts, 10, 1, 8,
                  DIGITS["mean"], DIGITS["std"], n_max)


# -------------------------------------------------------------------------------------------------
# Evaluation


def accuracy_report(preds, labels, counts):
    """Top-1 accuracy in percent: overall, Many / Medium / Few (None if a group has no class)
    and per class (None for a class absent from `labels`)."""
    preds = torch.as_tensor(preds).cpu().long()
    labels = torch.as_tensor(labels).cpu().long()
    correct = (preds == labels).double()
    num_classes = len(counts)
    hits = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, correct)
    seen = torch.bincount(labels, minlength=num_classes).double()
    per_class = [100.0 * h / n if n > 0 else None for h, n in zip(hits.tolist(), seen.tolist())]
    report = {"overall": 100.0 * correct.mean().item() if len(labels) else None}
    for group, classes in shot_groups(counts).items():
        accs = [per_class[c] for c in classes if per_class[c] is not None]
        report[group] = sum(accs) / len(accs) if accs else None
    report["per_class"] = per_class
    return report


def logit_adjust(logits, prior, tau=1.0):
    """Post-hoc logit adjustment (Menon et al. 2021): logits - tau * log(prior)."""
    prior = torch.as_tensor(prior, dtype=torch.float64)
    prior = prior / prior.sum()
    return logits - tau * torch.log(prior).to(logits.dtype).to(logits.device)


def frechet_distance(feats_a, feats_b):
    """Frechet distance between Gaussian fits of two feature sets (rows are samples):
    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), computed in float64.

    The trace of the matrix square root is the sum of the square roots of the eigenvalues of
    S_a^(1/2) S_b S_a^(1/2), which is symmetric positive semi-definite.
    """
    a = torch.as_tensor(feats_a, dtype=torch.float64)
    b = torch.as_tensor(feats_b, dtype=torch.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    w, v = torch.linalg.eigh(s_a)
    root_a = (v * w.clamp(min=0).sqrt()) @ v.T
    mid = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp(min=0)
    d = (mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * mid.sqrt().sum()
    return max(d.item(), 0.0)


# -------------------------------------------------------------------------------------------------
# Small helpers both scripts need: seeding, device, atomic files, run directories


def seed_everything(seed):
    """Seed Python, numpy and torch global RNGs (model init, dropout); data picks use their own
    generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name="auto"):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise BadInput(f"unknown device {name!r}; use auto, cpu, cuda or mps")
    if name == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda asked for, but no CUDA device is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None
                              and torch.backends.mps.is_available()):
        raise BadInput("--device mps asked for, but MPS is not available")
    return torch.device(name)


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: the permissions an ordinary open() would give


def atomic_write(path, write):
    """Call write(f) on a temporary file in the same folder, then rename it to path: a reader sees
    the old file or the whole new one, never half of it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # mkstemp makes 0600; a plain open would not
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, then rename: never a half-written file."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_json(obj, path):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def load_checkpoint(path, map_location="cpu", keys=(), into=None):
    """torch.load that turns a missing, truncated or foreign file into BadInput naming the file.

    keys: the entries the caller reads. A file without them is some other checkpoint (another
    stage's, another program's), which would otherwise fail later with a KeyError or a
    state-dict mismatch. into: {entry: module or optimizer} to load those entries into; a state
    that does not fit (a checkpoint of a differently sized model) is BadInput as well. Both
    scripts keep a stage's files in <out>/<stage>/, so the folder name is the stage to --redo.
    """
    into = into or {}
    redo = f"rerun with --redo {os.path.basename(os.path.dirname(os.path.abspath(path)))}"
    if not os.path.isfile(path):
        raise BadInput(f"checkpoint {path} is missing; {redo}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # pickle, zip and torch errors all mean the same thing here
        raise BadInput(f"checkpoint {path} is corrupt or not a checkpoint ({type(e).__name__}); "
                       f"{redo}") from None
    keys = (*into, *keys)
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in keys):
        expected = f"a dict with {', '.join(map(repr, keys))}" if keys else "a dict"
        raise BadInput(f"checkpoint {path} is not one of ours (expected {expected}); {redo}")
    for key, target in into.items():
        try:
            target.load_state_dict(ckpt[key])
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
            detail = " ".join(str(e).split())  # torch's message spans lines
            detail = detail if len(detail) <= 160 else detail[:157] + "..."
            raise BadInput(f"checkpoint {path}: {key!r} does not fit this run's model ({detail}); "
                           f"{redo}") from None
    return ckpt


def check_run_dir(out, config, ignore=(), may_change=()):
    """Write <out>/config.json, or check that an existing one agrees with `config`.

    Fields in `ignore` (where the run lives, which device) may differ, and so may those in
    `may_change`: the fields read only by the stages that --redo is about to recompute (the caller
    rewrites config.json once those stages are cleared). Any other difference would mix results of
    two configurations in one directory and is an error.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise BadInput(f"--out {out} is a file, not a directory; use another --out")
    path = os.path.join(out, "config.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                old = json.load(f)
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError):
            raise BadInput(f"{path} is unreadable; delete the run directory or use another --out") \
                from None
        diff = sorted(k for k in set(old) | set(config)
                      if k not in ignore and k not in may_change and old.get(k) != config.get(k))
        if diff:
            k = diff[0]
            raise BadInput(f"run directory {out} was made with another config ({k}: "
                           f"{old.get(k)!r} there, {config.get(k)!r} now"
                           f"{f', and {len(diff) - 1} more' if len(diff) > 1 else ''}); "
                           f"use another --out, delete it, or --redo the first stage that reads it")
    elif os.path.isdir(out) and os.listdir(out):
        raise BadInput(f"{out} exists, is not empty and has no config.json; use another --out")
    else:
        atomic_json(config, path)
