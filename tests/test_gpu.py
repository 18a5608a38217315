"""The CUDA paths: bf16, torch.compile, NCCL and SyncBatchNorm, --estimate, and the speed of the
training steps. Collected by the normal suite, where every test is skipped with its reason when
CUDA is absent. On a GPU machine, everything here (the figures with -s):

    python -m pytest -m "gpu or bench" -s tests/test_gpu.py
"""
import json
import math
import os
import statistics
import subprocess
import sys
import time
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import diffult  # noqa: E402

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def cli(*args, launcher=(sys.executable,), timeout=1800):
    return subprocess.run([*launcher, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def finite_numbers(value):
    """Every number in a results.json value, for the check that none is nan or inf."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in finite_numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in finite_numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def check_results(out):
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    assert all(r["overall"] is not None for r in res["rows"].values())
    numbers = finite_numbers({"rows": res["rows"], "generated": res["generated"]})
    assert numbers and all(math.isfinite(x) for x in numbers)


@pytest.mark.gpu
@pytest.mark.parametrize("script", ["diffult", "ldmlr"])
@pytest.mark.parametrize("flags", [["--precision", "bf16"], ["--precision", "bf16", "--compile"]],
                         ids=["bf16", "bf16-compile"])
def test_smoke_pipeline_on_cuda(script, flags, tmp_path):
    out = str(tmp_path / "run")
    r = cli(f"{script}.py", "--smoke", "--device", "cuda", "--out", out, *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    check_results(out)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("script", ["diffult", "ldmlr"])
def test_torchrun_on_two_gpus(script, tmp_path):
    """NCCL, SyncBatchNorm and DDP on CUDA; rank 0 writes the results."""
    out = str(tmp_path / "run")
    r = cli(f"{script}.py", "--smoke", "--device", "cuda", "--out", out,
            launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone",
                      "--nproc_per_node", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    check_results(out)


@pytest.mark.gpu
@pytest.mark.parametrize("script", ["diffult", "ldmlr"])
def test_estimate_on_cuda(script, tmp_path):
    r = cli(f"{script}.py", "--estimate", "--dataset", "cifar100", "--device", "cuda",
            "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout)
    assert "total" in r.stdout and not os.path.exists(tmp_path / "run")


# ---- speed: figures and ratios, no assertion on them ----------------------------------------------

def median_rate(step, items, warmup=3, reps=10):
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return items / statistics.median(times)


def training_steps(model, batch, forward):
    """{variant: images/s} of forward + backward + Adam in fp32, bf16 and bf16 + compile."""
    rates = {}
    for name, bf16, compiled in (("fp32", False, False), ("bf16", True, False),
                                 ("bf16+compile", True, True)):
        net = torch.compile(model) if compiled else model
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                loss = forward(net).float().square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        rates[name] = median_rate(step, batch)
    return rates


@pytest.mark.bench
def test_cuda_training_steps():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    cfg = diffult.parse_config(["--dataset", "cifar100"])
    unet = diffult.make_unet(cfg, types.SimpleNamespace(num_classes=100, channels=3)).to(dev)
    unet.to(memory_format=torch.channels_last)
    b = cfg.diffusion_batch
    x = torch.randn(b, 3, 32, 32, device=dev)
    t, y = torch.randint(1000, (b,), device=dev), torch.randint(100, (b,), device=dev)
    resnet = diffult.make_classifier("resnet32", 100, 3).to(dev)
    resnet.to(memory_format=torch.channels_last)
    xr = torch.randn(128, 3, 32, 32, device=dev)
    print(f"\n[bench] {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    for name, model, batch, forward in (
            ("CIFAR UNet (35.7 M)", unet, b, lambda net: net(x, t, y)),
            ("ResNet-32", resnet, 128, lambda net: net(xr))):
        rates = training_steps(model, batch, forward)
        base = rates["fp32"]
        print(f"  {name:<20} batch {batch:4d}   " + "   ".join(
            f"{k} {v:9.1f} img/s ({v / base:.2f}x)" for k, v in rates.items()))
        assert all(math.isfinite(v) and v > 0 for v in rates.values())
