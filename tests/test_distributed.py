"""Both scripts under torchrun: two CPU processes (gloo, over loopback only) through the real
command line, marked slow. Each rank trains on its share of the data with its own noise and DDP
averages the gradients; bit-equality with one process is not a goal."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import diffult  # noqa: E402
import ldmlr  # noqa: E402

# The rows a single-process run writes (test_diffult.py / test_ldmlr.py check them there).
ROWS = {"diffult": {"CE", "LA", "DiffuLT", "DiffuLT+LA"},
        "ldmlr": {"CE", "LA", "CE+LDMLR", "LA+LDMLR", "cRT"}}
TABLE_HEADER = re.compile(r"^row\s+overall\s+many\s+medium\s+few$", re.M)
# Odd global batches: each rank takes batch // 2 of them.
EXTRA = {"diffult": ["--diffusion-batch", "15"], "ldmlr": ["--diffusion-batch", "255"]}


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
    """The 'stage: done, skipped' lines of a run (on stderr)."""
    return [l for l in proc.stderr.splitlines() if l.startswith(f"[{script}]")
            and l.endswith(": done, skipped")]


@pytest.fixture(scope="module", params=["diffult", "ldmlr"])
def ddp_run(request, tmp_path_factory):
    script = request.param
    out = str(tmp_path_factory.mktemp(script) / "run")
    proc = torchrun(script, out, *EXTRA[script])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return script, out, proc


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
def test_bad_input_under_torchrun_ends_every_rank_with_one_line(tmp_path):
    """A run directory made with another config: rank 0 finds it (only rank 0 reads and writes
    config.json), and every rank must exit rather than wait for it. torchrun itself then exits
    with 1 and reports the ranks' exit codes; the script's own line appears once."""
    out = str(tmp_path / "run")
    os.makedirs(out)
    ldmlr.save_json({"dataset": "digits", "la_tau": 0.5}, os.path.join(out, "config.json"))
    proc = torchrun("ldmlr", out)
    assert proc.returncode == 1  # torchrun's own code for "a worker failed"
    lines = [l for l in proc.stderr.splitlines() if "ldmlr.py: error:" in l]
    assert len(lines) == 1 and "another config" in lines[0], proc.stderr[-3000:]
    assert re.search(r"exitcode\s*:\s*2\b", proc.stderr), proc.stderr[-3000:]
    assert not os.path.exists(os.path.join(out, "encoder"))
