"""lt_data.py: long-tail profiles, subsets, splits, evaluation and the real loaders on small files
written here in the real on-disk formats."""
import functools
import hashlib
import http.server
import math
import os
import pickle
import random
import tarfile
import threading
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import lt_data
from lt_data import BadInput

# -------------------------------------------------------------------------------------------------
# lt_counts


# Ratios as a user types them: whole numbers, or decimals such as 12.5 or 1.6.
RATIOS = st.one_of(st.integers(1, 500), st.integers(100, 50000).map(lambda k: k / 100))


def exact_floor(n_max, imb):
    """floor(n_max / imb) in exact decimal arithmetic (8 / 1.6 is 5, though 8 // 1.6 is 4.0)."""
    return math.floor(Fraction(n_max) / Fraction(str(imb)))


@given(n_max=st.integers(1, 10000), num_classes=st.integers(2, 200), imb=RATIOS)
def test_exp_profile_properties(n_max, num_classes, imb):
    counts = lt_data.lt_counts(n_max, num_classes, imb)
    assert len(counts) == num_classes
    assert counts[0] == n_max
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert all(c >= 1 for c in counts)
    assert counts[-1] == max(1, exact_floor(n_max, imb))


def test_exp_profile_float_ratio_is_exact_at_the_tail():
    assert lt_data.lt_counts(8, 2, 1.6) == [8, 5]
    assert lt_data.lt_counts(98, 2, 49) == [98, 2]


@given(n_max=st.integers(1, 10000), num_classes=st.integers(1, 200))
def test_ratio_one_is_uniform(n_max, num_classes):
    assert lt_data.lt_counts(n_max, num_classes, 1) == [n_max] * num_classes
    assert lt_data.lt_counts(n_max, num_classes, 1, "step") == [n_max] * num_classes


@given(n_max=st.integers(1, 10000), num_classes=st.integers(2, 200), imb=RATIOS)
def test_step_profile_shape(n_max, num_classes, imb):
    counts = lt_data.lt_counts(n_max, num_classes, imb, "step")
    head = num_classes // 2
    assert counts[:head] == [n_max] * head
    assert counts[head:] == [max(1, exact_floor(n_max, imb))] * (num_classes - head)


@pytest.mark.parametrize("n_max,num_classes,totals", [
    (5000, 10, {100: 12406, 50: 13996, 10: 20431, 200: 11203}),
    (500, 100, {100: 10847, 50: 12608, 10: 19573, 200: 9502}),
])
def test_published_totals(n_max, num_classes, totals):
    for imb, total in totals.items():
        assert sum(lt_data.lt_counts(n_max, num_classes, imb)) == total


def test_cifar10_lt_r100_per_class():
    assert lt_data.lt_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


@pytest.mark.parametrize("imb", [0.5, 0, -3, float("nan")])
def test_bad_ratio(imb):
    with pytest.raises(BadInput):
        lt_data.lt_counts(500, 10, imb)


def test_bad_profile():
    with pytest.raises(BadInput, match="profile"):
        lt_data.lt_counts(500, 10, 10, "linear")


# -------------------------------------------------------------------------------------------------
# lt_subset: LDAM-DRW's draw


def ldam_reference(targets, counts, seed):
    """imbalance_cifar.py's gen_imbalanced_data as written there: np.random.seed once, then class
    by class in label order np.random.shuffle the class's indices and keep the first n."""
    np.random.seed(seed)
    keep = []
    for c, n in zip(np.unique(targets), counts):
        idx = np.where(targets == c)[0]
        np.random.shuffle(idx)
        keep.extend(idx[:n])
    return np.array(keep)


@settings(max_examples=50, deadline=None)
@given(per_class=st.integers(5, 60), num_classes=st.integers(2, 12), imb=st.integers(1, 30),
       seed=st.integers(0, 2 ** 31 - 1))
def test_lt_subset(per_class, num_classes, imb, seed):
    targets = np.random.default_rng(0).permutation(np.repeat(np.arange(num_classes), per_class))
    counts = lt_data.lt_counts(per_class, num_classes, imb)
    np_state, torch_state, py_state = np.random.get_state(), torch.get_rng_state(), random.getstate()
    keep = lt_data.lt_subset(targets, counts, seed)
    # the global RNGs are untouched
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    assert len(set(keep.tolist())) == len(keep)  # a subset: no repeats, all valid indices
    assert keep.min() >= 0 and keep.max() < len(targets)
    assert np.bincount(targets[keep], minlength=num_classes).tolist() == counts
    assert np.array_equal(keep, lt_data.lt_subset(targets, counts, seed))
    assert np.array_equal(keep, ldam_reference(targets, counts, seed))


def test_lt_subset_seed_changes_subset():
    targets = np.repeat(np.arange(10), 100)
    counts = lt_data.lt_counts(100, 10, 10)
    a = lt_data.lt_subset(targets, counts, 0)
    b = lt_data.lt_subset(targets, counts, 1)
    assert not np.array_equal(a, b)


def test_lt_subset_too_few_samples():
    with pytest.raises(BadInput, match="class 1"):
        lt_data.lt_subset(np.array([0, 0, 1]), [1, 2], 0)


# -------------------------------------------------------------------------------------------------
# shot_groups and accuracy_report


@given(st.lists(st.integers(1, 2000), min_size=1, max_size=300))
def test_shot_groups_partition(counts):
    g = lt_data.shot_groups(counts)
    everything = g["many"] + g["medium"] + g["few"]
    assert sorted(everything) == list(range(len(counts)))
    assert all(counts[c] > 100 for c in g["many"])
    assert all(counts[c] < 20 for c in g["few"])
    assert all(20 <= counts[c] <= 100 for c in g["medium"])


def test_shot_groups_cifar100_r100():
    g = lt_data.shot_groups(lt_data.lt_counts(500, 100, 100))
    assert (len(g["many"]), len(g["medium"]), len(g["few"])) == (35, 35, 30)


def test_accuracy_report_hand_built():
    counts = [200, 50, 5]  # one class in each group
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    preds = torch.tensor([0, 0, 0, 1, 1, 0, 0, 0])
    r = lt_data.accuracy_report(preds, labels, counts)
    assert r["per_class"] == [75.0, 50.0, 0.0]
    assert r["overall"] == pytest.approx(100 * 4 / 8)
    assert (r["many"], r["medium"], r["few"]) == (75.0, 50.0, 0.0)


def test_accuracy_report_empty_group():
    counts = [500, 300, 30, 30]  # no Few class
    labels = torch.tensor([0, 1, 2, 3])
    r = lt_data.accuracy_report(torch.tensor([0, 1, 2, 0]), labels, counts)
    assert r["few"] is None
    assert r["many"] == 100.0 and r["medium"] == 50.0
    assert r["overall"] == 75.0


# -------------------------------------------------------------------------------------------------
# Post-hoc logit adjustment and the Frechet distance


@given(st.integers(2, 50), st.floats(0.1, 3.0))
def test_logit_adjust_uniform_prior_is_identity_up_to_shift(num_classes, tau):
    logits = torch.randn(7, num_classes, dtype=torch.float64)
    adjusted = lt_data.logit_adjust(logits, [13] * num_classes, tau)
    shift = adjusted - logits  # a constant per row: predictions and softmax are unchanged
    assert torch.allclose(shift, shift[:, :1].expand_as(shift))
    assert torch.equal(adjusted.argmax(1), logits.argmax(1))


def test_logit_adjust_favours_rare_classes():
    logits = torch.zeros(1, 2)
    adjusted = lt_data.logit_adjust(logits, [90, 10])
    assert adjusted[0, 1] > adjusted[0, 0]
    assert torch.allclose(adjusted[0, 1] - adjusted[0, 0], torch.tensor(np.log(9.0), dtype=torch.float32))


def test_frechet_identical_sets_is_zero():
    a = torch.randn(300, 6, generator=torch.Generator().manual_seed(0))
    assert lt_data.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_symmetric_and_closed_form():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(400, 5, generator=g), 2 * torch.randn(400, 5, generator=g) + 1
    assert lt_data.frechet_distance(a, b) == pytest.approx(lt_data.frechet_distance(b, a), rel=1e-6)
    # Closed form for commuting covariances: ||mu_a - mu_b||^2 + sum (sqrt(s_a) - sqrt(s_b))^2
    da = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
    db = torch.diag(torch.tensor([4.0, 1.0, 0.5]))
    x = torch.randn(50000, 3, generator=g, dtype=torch.float64)
    fa, fb = x @ da.double(), x @ db.double() + 1.0
    expect = 3 * 1.0 + ((da.diag() - db.diag()) ** 2).sum().item()
    assert lt_data.frechet_distance(fa, fb) == pytest.approx(expect, rel=0.02)


@settings(max_examples=30, deadline=None)
@given(small=st.floats(0.0, 2.0), extra=st.floats(0.1, 3.0), seed=st.integers(0, 1000))
def test_frechet_grows_with_shift(small, extra, seed):
    a = torch.randn(200, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    direction = torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=torch.float64)
    d_small = lt_data.frechet_distance(a, a + small * direction)
    d_large = lt_data.frechet_distance(a, a + (small + extra) * direction)
    assert d_large > d_small
    # a pure shift changes only the mean term
    assert d_small == pytest.approx(small ** 2 * direction.square().sum().item(), abs=1e-6)


# -------------------------------------------------------------------------------------------------
# Loaders: digits (offline), CIFAR on tiny files in the official pickle format, ImageNet-LT lists


def test_digits_offline():
    d = lt_data.load_dataset("digits", imb=20, seed=0)
    assert d.train_counts == lt_data.lt_counts(110, 10, 20)
    assert torch.bincount(d.train.labels, minlength=10).tolist() == d.train_counts
    assert d.train.images.shape[1:] == (1, 8, 8) and d.train.images.dtype == torch.uint8
    assert torch.bincount(d.test.labels).tolist() == [40] * 10
    assert torch.bincount(d.val.labels).tolist() == [20] * 10
    # test / val fixed across seeds; train differs
    e = lt_data.load_dataset("digits", imb=20, seed=1)
    assert torch.equal(d.test.images, e.test.images) and torch.equal(d.val.images, e.val.images)
    assert not torch.equal(d.train.images, e.train.images)
    # the three splits are disjoint (the 1797 digit images are all distinct)
    def keys(ds):
        return {x.numpy().tobytes() for x in ds.images}
    train, val, test = keys(d.train), keys(d.val), keys(d.test)
    assert len(train) == len(d.train) and len(val) == 200 and len(test) == 400
    assert not (train & val or train & test or val & test)
    assert (d.channels, d.image_size, d.num_classes) == (1, 8, 10)


def test_unknown_dataset_and_bad_ratio():
    with pytest.raises(BadInput, match="unknown dataset"):
        lt_data.load_dataset("mnist")
    with pytest.raises(BadInput, match="imb"):
        lt_data.load_dataset("digits", imb=0.5)


def _write_cifar(root, name, per_class, rng):
    """Tiny CIFAR folders in the real python-pickle format."""
    num_classes = 10 if name == "cifar10" else 100
    def batch(n_per_class):
        labels = np.repeat(np.arange(num_classes), n_per_class)
        rng.shuffle(labels)
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        return data, labels.tolist()
    if name == "cifar10":
        folder = os.path.join(root, "cifar-10-batches-py")
        os.makedirs(folder)
        for i in range(1, 6):
            data, labels = batch(per_class // 5)
            with open(os.path.join(folder, f"data_batch_{i}"), "wb") as f:
                pickle.dump({"data": data, "labels": labels, "batch_label": f"batch {i}"}, f)
        data, labels = batch(2)
        with open(os.path.join(folder, "test_batch"), "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
        with open(os.path.join(folder, "batches.meta"), "wb") as f:
            pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    else:
        folder = os.path.join(root, "cifar-100-python")
        os.makedirs(folder)
        for split, n in (("train", per_class), ("test", 2)):
            data, labels = batch(n)
            with open(os.path.join(folder, split), "wb") as f:
                pickle.dump({"data": data, "fine_labels": labels,
                             "coarse_labels": [l // 5 for l in labels]}, f)
        with open(os.path.join(folder, "meta"), "wb") as f:
            pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    return folder


@pytest.fixture
def no_md5(monkeypatch):
    """Small files in the real format cannot have the official md5s: pass torchvision's per-file
    check where the file exists, as torchvision's own tests do with their fake data."""
    import torchvision.datasets.cifar
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity",
                        lambda path, md5=None: os.path.isfile(path))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_real_format(tmp_path, name, no_md5):
    folder = _write_cifar(str(tmp_path), name, per_class=20, rng=np.random.default_rng(0))
    d = lt_data.load_dataset(name, str(tmp_path), imb=10, seed=3, n_max=20)
    num_classes = 10 if name == "cifar10" else 100
    assert d.num_classes == num_classes and d.channels == 3 and d.image_size == 32
    assert d.train_counts == lt_data.lt_counts(20, num_classes, 10)
    assert torch.bincount(d.train.labels, minlength=num_classes).tolist() == d.train_counts
    assert d.train.images.shape[1:] == (3, 32, 32) and d.train.images.dtype == torch.uint8
    assert len(d.test) == 2 * num_classes and d.val is None
    # each pickled row is the red plane, then green, then blue, each 32 rows of 32 values
    with open(os.path.join(folder, "test_batch" if name == "cifar10" else "test"), "rb") as f:
        raw = pickle.load(f)
    green = raw["data"][0, 1024:2048].reshape(32, 32)
    assert torch.equal(d.test.images[0, 1], torch.from_numpy(green))
    assert d.test.labels[0] == raw["labels" if name == "cifar10" else "fine_labels"][0]
    # the kept training images are the subset LDAM-DRW's procedure draws from the training
    # pickles (seed 3 here; seed 0 is the standard subset), in its order, with their labels
    files = [f"data_batch_{i}" for i in range(1, 6)] if name == "cifar10" else ["train"]
    data, labels = [], []
    for file in files:
        with open(os.path.join(folder, file), "rb") as f:
            batch = pickle.load(f)
        data.append(batch["data"])
        labels += batch["labels" if name == "cifar10" else "fine_labels"]
    keep = ldam_reference(np.array(labels), d.train_counts, 3)
    expected = np.concatenate(data)[keep].reshape(-1, 3, 32, 32)
    assert torch.equal(d.train.images, torch.from_numpy(expected))
    assert d.train.labels.tolist() == np.array(labels)[keep].tolist()


def test_cifar_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(BadInput, match="--no-download"):
        lt_data.load_dataset("cifar10", str(tmp_path), imb=100)


def test_cifar_corrupt_batch_is_bad_input(tmp_path, no_md5):
    folder = _write_cifar(str(tmp_path), "cifar100", per_class=5, rng=np.random.default_rng(2))
    with open(os.path.join(folder, "train"), "wb") as f:
        f.write(b"truncated")
    with pytest.raises(BadInput, match="not a CIFAR batch"):
        lt_data.load_dataset("cifar100", str(tmp_path), imb=1, n_max=5)


@pytest.fixture
def server(tmp_path):
    """An HTTP server on the loopback address, serving tmp_path / "www"; yields its base URL."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *args: None
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
        httpd.shutdown()


def _cifar_archive(tmp_path, name, monkeypatch, server):
    """A tiny archive in the official layout, served to torchvision over HTTP on loopback."""
    src = tmp_path / "src"
    folder = _write_cifar(str(src), name, per_class=5, rng=np.random.default_rng(3))
    archive = tmp_path / "www" / "archive.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=os.path.basename(folder))
    cls = lt_data.CIFAR[name][0]
    monkeypatch.setattr(cls, "url", f"{server}/archive.tar.gz")
    monkeypatch.setattr(cls, "filename", "archive.tar.gz")
    monkeypatch.setattr(cls, "tgz_md5", hashlib.md5(archive.read_bytes()).hexdigest())
    return cls


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_download_checks_md5_and_unpacks(tmp_path, monkeypatch, no_md5, server, name):
    cls = _cifar_archive(tmp_path, name, monkeypatch, server)
    root = tmp_path / "data"
    d = lt_data.load_dataset(name, str(root), imb=1, n_max=5, download=True)
    assert sum(d.train_counts) == len(d.train) == 5 * d.num_classes
    assert (root / cls.base_folder).is_dir()
    # an archive that is not the official one (wrong md5) is refused and says so
    root2 = tmp_path / "data2"
    monkeypatch.setattr(cls, "tgz_md5", "0" * 32)
    with pytest.raises(BadInput, match="md5"):
        lt_data.load_dataset(name, str(root2), imb=1, n_max=5, download=True)
    assert not (root2 / cls.base_folder).exists()


def test_cifar_download_failure_is_bad_input(tmp_path, monkeypatch, server):
    monkeypatch.setattr(lt_data.CIFAR["cifar10"][0], "url", f"{server}/nowhere.tar.gz")  # a 404
    with pytest.raises(BadInput, match="could not download"):
        lt_data.load_dataset("cifar10", str(tmp_path / "data"), imb=1, download=True)
    assert not os.listdir(tmp_path / "data")  # no half-written archive left behind


def _write_imagenet_lt(root, per_class_train=(3, 2, 1), test_per_class=2):
    from PIL import Image
    rng = np.random.default_rng(0)
    lines = {}
    for split, per_class in (("train", per_class_train), ("test", [test_per_class] * 3)):
        rows = []
        for c, n in enumerate(per_class):
            for i in range(n):
                rel = f"{split}/n{c:08d}/img_{i}.JPEG"
                os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
                size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
                Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
                    os.path.join(root, rel), "JPEG")
                rows.append(f"{rel} {c}")
        lines[split] = rows
        with open(os.path.join(root, f"ImageNet_LT_{split}.txt"), "w") as f:
            f.write("\n".join(rows) + "\n")
    return lines


def test_imagenet_lt_lists(tmp_path):
    _write_imagenet_lt(str(tmp_path))
    d = lt_data.load_dataset("imagenet_lt", str(tmp_path), image_size=16)
    assert d.num_classes == 1000 and d.train_counts[:4] == [3, 2, 1, 0]
    assert len(d.train) == 6 and len(d.test) == 6 and d.val is None
    x, y = d.train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and int(y) == 0
    assert d.n_max == 3
    assert d.train_plain[0][0].shape == (3, 16, 16) and d.test[0][0].shape == (3, 16, 16)


@pytest.mark.parametrize("bad_line,match", [
    ("train/n00000000/img_0.JPEG", "line 2"),               # no label
    ("train/n00000000/img_0.JPEG zero", "line 2"),          # label not an integer
    ("train/n00000000/img_0.JPEG 1000", "outside"),         # label out of range
    ("train/n00000000/missing.JPEG 0", "not found"),        # image missing
])
def test_imagenet_lt_malformed_list(tmp_path, bad_line, match):
    lines = _write_imagenet_lt(str(tmp_path))
    with open(os.path.join(tmp_path, "ImageNet_LT_train.txt"), "w") as f:
        f.write("\n".join([lines["train"][0], bad_line] + lines["train"][1:]) + "\n")
    with pytest.raises(BadInput, match=match) as e:
        lt_data.load_dataset("imagenet_lt", str(tmp_path))
    assert "ImageNet_LT_train.txt" in str(e.value)


def test_imagenet_lt_missing_list(tmp_path):
    with pytest.raises(BadInput, match="ImageNet_LT_train.txt"):
        lt_data.load_dataset("imagenet_lt", str(tmp_path))


def test_imagenet_lt_unreadable_image(tmp_path):
    _write_imagenet_lt(str(tmp_path))
    with open(os.path.join(tmp_path, "train/n00000000/img_0.JPEG"), "wb") as f:
        f.write(b"not a jpeg")
    d = lt_data.load_dataset("imagenet_lt", str(tmp_path), image_size=16)
    with pytest.raises(BadInput, match="img_0.JPEG"):
        d.train[0]
