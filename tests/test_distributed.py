"""Both scripts under torchrun: two CPU processes (gloo, over loopback only) through the real
command line, marked slow; and, fast, the per-rank slicing of a global batch the training loops
rely on."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import diffult  # noqa: E402
import ldmlr  # noqa: E402
import lt_data  # noqa: E402

# The rows a single-process run writes (test_diffult.py / test_ldmlr.py check them there).
ROWS = {"diffult": {"CE", "LA", "DiffuLT", "DiffuLT+LA"},
        "ldmlr": {"CE", "LA", "CE+LDMLR", "LA+LDMLR", "cRT"}}
TABLE_HEADER = re.compile(r"^row\s+overall\s+many\s+medium\s+few$", re.M)
# Odd global batches, so the two ranks get different numbers of rows; no dropout in diffult's
# denoiser, so that a single process must train the very same one (test_ddp_trains_...).
EXTRA = {"diffult": ["--diffusion-batch", "15", "--unet-dropout", "0"],
         "ldmlr": ["--diff-batch", "255"]}


def torchrun(script, out, *args):
    """`torchrun --standalone --nproc_per_node 2 <script> --dataset digits --smoke --device cpu`,
    run as python -m torch.distributed.run (the same thing, without needing it on PATH). The
    timeout only turns a hang into a failure."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, f"{script}.py"), "--dataset", "digits", "--smoke", "--device", "cpu",
           "--out", out, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def skipped_lines(script, proc):
    """The 'stage done, skipped' lines of a run: stderr for diffult.py, stdout for ldmlr.py."""
    if script == "diffult":
        return [l for l in proc.stderr.splitlines() if l.startswith("[diffult]")
                and l.endswith(": done, skipped")]
    return [l for l in proc.stdout.splitlines() if l.endswith("] done, skipped")]


@pytest.fixture(scope="module", params=["diffult", "ldmlr"])
def ddp_run(request, tmp_path_factory):
    script = request.param
    out = str(tmp_path_factory.mktemp(script) / "run")
    proc = torchrun(script, out, *EXTRA[script])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return script, out, proc


# ---- fast: the slicing of a global batch ---------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), world=st.integers(1, 8), seed=st.integers(0, 1000))
def test_rank_rows_partition_the_global_batch_and_keep_its_mean(n, world, seed):
    loss = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for mod in (diffult, ldmlr):
        slices, means = [], []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(mod, "world_size", lambda: world)
            for r in range(world):
                mp.setattr(mod, "rank", lambda r=r: r)
                rows = mod.my_rows(n)
                slices.append(torch.arange(n)[rows])
                if n > 0:  # a training batch is never empty
                    means.append(mod.global_mean(loss[rows], n))
        # consecutive, disjoint, covering: the ranks' rows are the global batch, in order
        assert torch.equal(torch.cat(slices), torch.arange(n))
        sizes = [len(s) for s in slices]
        assert max(sizes) - min(sizes) <= 1 and (n == 0 or sizes[0] > 0)
        # what DDP computes (the average over ranks) is the mean over the global batch
        if n > 0:
            assert (sum(means) / world).item() == pytest.approx(loss.mean().item(), rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(world=st.integers(1, 5), seed=st.integers(0, 1000), flip=st.booleans())
def test_a_rank_augments_its_rows_as_one_process_augments_them(world, seed, flip):
    """Draws made for the whole global batch, applied to one rank's rows, give that rank the rows
    of the batch one process augments."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (13, 1, 8, 8), generator=gen, dtype=torch.uint8)
    draws = diffult.augment_draws(len(x), gen, 2, flip)
    whole = diffult.augment(x, draws, 2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(diffult, "world_size", lambda: world)
        for r in range(world):
            mp.setattr(diffult, "rank", lambda r=r: r)
            rows = diffult.my_rows(len(x))
            mine = diffult.augment(x[rows], [d if d is None else d[rows] for d in draws], 2)
            assert torch.equal(mine, whole[rows])


# ---- slow: two processes through the command line ------------------------------------------------

@pytest.mark.slow
def test_torchrun_writes_every_result_once_and_a_rerun_skips_every_stage(ddp_run):
    script, out, proc = ddp_run
    mod = {"diffult": diffult, "ldmlr": ldmlr}[script]
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    assert {"method", "dataset", "imb", "seed", "train_counts", "rows", "generated", "timing_s",
            "config"} <= set(res)
    assert res["method"] == script and set(res["rows"]) == ROWS[script]
    for row in res["rows"].values():
        assert set(row) == {"overall", "many", "medium", "few", "per_class"}
        assert len(row["per_class"]) == 10 and 0 <= row["overall"] <= 100
    assert set(res["timing_s"]) == set(mod.STAGES)
    for stage in mod.STAGES:
        assert os.path.isfile(os.path.join(out, stage, "done.json")), stage
    if script == "diffult":  # shard i comes from rank i % 2: all of them must be there
        with open(os.path.join(out, "generate", "done.json")) as f:
            n_shards = json.load(f)["shards"]
        assert n_shards >= 2  # both ranks had shards to write
        shards = sorted(f for f in os.listdir(os.path.join(out, "generate"))
                        if f.startswith("shard_"))
        assert shards == [f"shard_{i:05d}.pt" for i in range(n_shards)]
        assert sum(res["generated"]["counts"]) == sum(
            len(torch.load(os.path.join(out, "generate", s))["labels"]) for s in shards)
    assert len(TABLE_HEADER.findall(proc.stdout)) == 1, proc.stdout  # rank 0 alone prints it
    for name in ROWS[script]:
        assert len(re.findall(rf"^{re.escape(name)}\s", proc.stdout, re.M)) == 1, name

    again = torchrun(script, out, *EXTRA[script])
    assert again.returncode == 0, again.stderr[-3000:]
    skipped = skipped_lines(script, again)
    assert len(skipped) == len(mod.STAGES)  # every stage, said once (by rank 0)
    assert all(any(s in line for line in skipped) for s in mod.STAGES)
    assert len(TABLE_HEADER.findall(again.stdout)) == 1
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["rows"] == res["rows"]


@pytest.mark.slow
def test_ddp_trains_the_denoiser_one_process_trains(ddp_run, tmp_path):
    """The diffusion stages have no BatchNorm (and here no dropout): on the same inputs, one process
    must train the same denoiser as the two ranks did, up to float rounding, although the global
    batches (15 and 255) split unevenly between the ranks. This checks that each rank takes its
    own rows of the same global batch and that the averaged gradient is the global batch's."""
    script, out, _ = ddp_run
    mod = {"diffult": diffult, "ldmlr": ldmlr}[script]
    single = str(tmp_path / "single")
    shutil.copytree(out, single)
    shutil.rmtree(os.path.join(single, "diffusion"))
    cfg = mod.parse_config(["--dataset", "digits", "--smoke", "--device", "cpu", "--out", single,
                            *EXTRA[script]])
    data = lt_data.load_dataset("digits", imb=cfg.imb, seed=cfg.seed)
    # the global RNG state run() gives the stage (its init draws from it)
    lt_data.seed_everything(cfg.seed + (1_000_003 * mod.STAGES.index("diffusion")
                                        if mod is ldmlr else 0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (OMP_NUM_THREADS=1); also much faster on 2 cores
    try:
        mod.stage_diffusion(cfg, data, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    a = torch.load(os.path.join(out, "diffusion", "ckpt.pt"), weights_only=False)
    b = torch.load(os.path.join(single, "diffusion", "ckpt.pt"), weights_only=False)
    steps = cfg.diffusion_steps if mod is diffult else cfg.diff_steps
    assert a["step"] == b["step"] == steps
    for key in ("model", "ema"):
        for name, value in a[key].items():
            assert torch.allclose(value, b[key][name], rtol=0, atol=1e-5), (key, name)


@pytest.mark.slow
def test_bad_input_under_torchrun_ends_every_rank_with_one_line(tmp_path):
    """A run directory made with another config: rank 0 finds it (only rank 0 reads and writes
    config.json), and every rank must exit rather than wait for it. torchrun itself then exits
    with 1 and reports the ranks' exit codes; the script's own line appears once."""
    out = str(tmp_path / "run")
    os.makedirs(out)
    lt_data.atomic_json({"dataset": "digits", "tau": 0.5}, os.path.join(out, "config.json"))
    proc = torchrun("ldmlr", out)
    assert proc.returncode == 1  # torchrun's own code for "a worker failed"
    lines = [l for l in proc.stderr.splitlines() if "ldmlr.py: error:" in l]
    assert len(lines) == 1 and "another config" in lines[0], proc.stderr[-3000:]
    assert re.search(r"exitcode\s*:\s*2\b", proc.stderr), proc.stderr[-3000:]
    assert not os.path.exists(os.path.join(out, "encoder"))
