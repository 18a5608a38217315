"""Long-tailed benchmarks shared by diffult.py and ldmlr.py: data, profiles, splits, evaluation.

    CIFAR-10-LT / CIFAR-100-LT   torchvision's CIFAR, subsampled as LDAM-DRW does (Cao et al. 2019)
    ImageNet-LT                  the fixed split of Liu et al. 2019, read from its list files
    digits                       scikit-learn's bundled UCI digits made long-tailed: fully offline

In-memory datasets (CIFAR, digits) come back as uint8 image tensors (N, C, H, W) that the
scripts augment on the device; ImageNet-LT is read lazily through torchvision's transforms.
"""
import math
import os
import socket
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torchvision.transforms as T
from torchvision.datasets import CIFAR10, CIFAR100
from torch.utils.data import Dataset


class BadInput(Exception):
    """A problem with the user's input or data: the scripts print its one line and exit 2."""


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
    # n_max / imb**e and a relative 1e-12 before the floor: the published counts, and a count that
    # is an integer in exact arithmetic is not lost to rounding (8 / 1.6 could come out below 5).
    if profile == "exp":
        e = [i / max(1, num_classes - 1) for i in range(num_classes)]
        return [max(1, int(math.floor(n_max / imb ** x * (1 + 1e-12)))) for x in e]
    if profile == "step":
        head = num_classes // 2
        tail = max(1, int(math.floor(n_max / imb * (1 + 1e-12))))
        return [int(n_max)] * head + [tail] * (num_classes - head)
    raise BadInput(f"unknown long-tail profile {profile!r}; use 'exp' or 'step'")


def lt_subset(targets, counts, seed):
    """Indices of the long-tailed subset, drawn as LDAM-DRW's imbalance_cifar.py draws it (and
    CBDM's and LDMLR's loaders after it): class by class in label order, shuffle that class's
    indices and keep the first counts[c]. The reference seeds numpy's global RNG with 0; a private
    RandomState(seed) is the same Mersenne Twister stream without the side effect, so seed 0 gives
    the standard subset, on which most published CIFAR-LT numbers were trained."""
    targets = np.asarray(targets)
    rng = np.random.RandomState(seed)
    keep = []
    for c, n in enumerate(counts):
        idx = np.flatnonzero(targets == c)
        if len(idx) < n:
            raise BadInput(f"class {c} has {len(idx)} samples, the profile asks for {n}")
        rng.shuffle(idx)
        keep.append(idx[:n])
    return np.concatenate(keep).astype(np.int64) if keep else np.zeros(0, np.int64)


def shot_groups(counts, many=100, few=20):
    """Many (> many), Medium and Few (< few) class lists (Kang et al. 2020 thresholds)."""
    groups = {"many": [], "medium": [], "few": []}
    for c, n in enumerate(counts):
        groups["many" if n > many else "few" if n < few else "medium"].append(c)
    return groups


# -------------------------------------------------------------------------------------------------
# Datasets: uint8 images (C, H, W) and int64 labels


class TensorImages(Dataset):
    """Images held in memory as one uint8 tensor (N, C, H, W); `transform` applies per image."""

    def __init__(self, images, labels, transform=None):
        self.images = torch.as_tensor(images, dtype=torch.uint8)
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.transform = transform
        assert self.images.ndim == 4 and len(self.images) == len(self.labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i]
        return (x if self.transform is None else self.transform(x)), self.labels[i]


def train_transform(size):
    """The field's ImageNet training augmentation: random-resized crop and horizontal flip."""
    return T.Compose([T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip()])


def eval_transform(size):
    """Resize the short side to size * 256 / 224, then centre-crop (the usual 256 -> 224)."""
    return T.Compose([T.Resize(round(size * 256 / 224), antialias=True), T.CenterCrop(size)])


class ImageList(Dataset):
    """ImageNet-LT images read lazily from their paths, as uint8 tensors after `transform`."""

    def __init__(self, root, paths, labels, transform):
        self.root, self.paths, self.transform = root, list(paths), transform
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
        return T.functional.pil_to_tensor(self.transform(im)), self.labels[i]


@dataclass
class LTData:
    """What load_dataset returns: the splits and what a model needs to know about them."""
    name: str
    train: Dataset            # long-tailed training set (ImageNet-LT: with training augmentation)
    train_plain: Dataset      # the same images un-augmented, for features and the generator
    val: Optional[Dataset]    # balanced validation split carved from training data, or None
    test: Dataset             # balanced test set
    train_counts: list        # images per class in `train`
    num_classes: int
    channels: int
    image_size: int
    mean: tuple               # per-channel normalisation of images scaled to [0, 1]
    std: tuple
    n_max: int                # head-class count of the profile


CIFAR = {  # torchvision class, head count, per-channel mean and std
    "cifar10": (CIFAR10, 5000, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": (CIFAR100, 500, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}
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


def _read_cifar(cls, root, train, download):
    """torchvision's CIFAR as uint8 (N, 3, 32, 32) images and int64 labels; torchvision downloads
    it and checks every md5. Every failure is one line; a 60 s socket timeout stops hanging."""
    folder = os.path.join(root, cls.base_folder)
    timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)
    if download and not os.path.isdir(folder):
        print(f"downloading {cls.__name__} into {root} (torchvision, md5-checked)", file=sys.stderr)
    try:
        ds = cls(root, train=train, download=download)
    except RuntimeError:  # torchvision's "Dataset not found or corrupted", or a bad archive
        how = "let the script download it (drop --no-download)" if not download else \
            "delete it and run again to download it afresh"
        raise BadInput(f"{folder} is missing or fails its md5 check; {how}, or unpack the "
                       f"official python-version archive into {root}") from None
    except OSError as e:  # no network, refused, timed out, disk full
        raise BadInput(f"could not download {cls.url} into {root}: {e}") from None
    except Exception as e:  # a file that passed its check but does not unpickle
        raise BadInput(f"{folder} is not a CIFAR batch ({type(e).__name__}: {e}); delete it and "
                       f"run again to download it afresh") from None
    finally:
        socket.setdefaulttimeout(timeout)
    images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))  # HWC -> CHW
    return images, torch.as_tensor(ds.targets, dtype=torch.int64)


def _load_cifar(name, root, imb, seed, download, profile, n_max=None):
    cls, default_n_max, mean, std = CIFAR[name]
    num_classes, n_max = (10 if name == "cifar10" else 100), n_max or default_n_max
    train_x, train_y = _read_cifar(cls, root, True, download)
    test_x, test_y = _read_cifar(cls, root, False, False)
    counts = lt_counts(n_max, num_classes, imb, profile)
    keep = torch.from_numpy(lt_subset(train_y.numpy(), counts, seed))
    train = TensorImages(train_x[keep], train_y[keep])
    return LTData(name, train, train, None, TensorImages(test_x, test_y), counts, num_classes,
                  3, 32, mean, std, n_max)


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


def _load_imagenet_lt(root, size):
    train = _read_list(os.path.join(root, "ImageNet_LT_train.txt"), root)
    test = _read_list(os.path.join(root, "ImageNet_LT_test.txt"), root)
    counts = np.bincount(train[1], minlength=1000).tolist()
    val_file = os.path.join(root, "ImageNet_LT_val.txt")  # the official 20-per-class val split
    plain = eval_transform(size)
    val = ImageList(root, *_read_list(val_file, root), plain) if os.path.isfile(val_file) else None
    return LTData("imagenet_lt", ImageList(root, *train, train_transform(size)),
                  ImageList(root, *train, plain), val, ImageList(root, *test, plain), counts,
                  1000, 3, size, *IMAGENET_STATS, max(counts))


def _load_digits(imb, seed, profile, n_max):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8))[:, None]  # (N,1,8,8)
    y = d.target.astype(np.int64)
    # Test and validation splits are drawn with a fixed generator, independent of --seed, so
    # every seed is evaluated on the same images.
    rng = np.random.default_rng(12345)
    perms = [rng.permutation(np.flatnonzero(y == c)) for c in range(10)]

    def rows(a, b):  # rows a:b of every class's permutation
        return torch.from_numpy(np.sort(np.concatenate([p[a:b] for p in perms])))
    t, v = DIGITS["test_per_class"], DIGITS["val_per_class"]
    test, val, pool = rows(0, t), rows(t, t + v), rows(t + v, None)
    counts = lt_counts(n_max, 10, imb, profile)
    keep = pool[lt_subset(y[pool], counts, seed)]
    y = torch.from_numpy(y)
    train, val, test = (TensorImages(x[i], y[i]) for i in (keep, val, test))
    return LTData("digits", train, train, val, test, counts, 10, 1, 8, DIGITS["mean"],
                  DIGITS["std"], n_max)


SHAPES = {  # each dataset's head count, classes, channels, image side, test images
    "cifar10": (5000, 10, 3, 32, 10000), "cifar100": (500, 100, 3, 32, 10000),
    "digits": (110, 10, 1, 8, 400), "imagenet_lt": (1280, 1000, 3, 224, 50000)}


def random_data(name, imb, per_class):
    """Random images in the shape of a dataset, to time its pipeline without it: per_class
    training (and test) images of every class, and the real profile's n_max. Returns (LTData, the
    real training counts); ImageNet-LT's are the exp profile scaled to its 115,846 images (ours)."""
    n_max, classes, channels, size, _ = SHAPES[name]
    counts = lt_counts(n_max, classes, 256 if name == "imagenet_lt" else imb)
    if name == "imagenet_lt":
        counts = [max(1, round(c * 115846 / sum(counts))) for c in counts]
    labels = torch.arange(classes).repeat(per_class)
    images = torch.randint(0, 256, (len(labels), channels, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    part = TensorImages(images, labels)
    return LTData(name, part, part, part, part, [per_class] * classes, classes, channels, size,
                  (0.5,) * channels, (0.25,) * channels, n_max), counts


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


def frechet_or_none(real, fake):
    """frechet_distance where both sets have more samples than dimensions, else None: with fewer,
    the covariance is singular and the number mostly says which directions were sampled (ours)."""
    if min(len(real), len(fake)) <= real.shape[1]:
        return None
    return frechet_distance(real, fake)
