"""Faults and bad input, through the command lines of diffult.py and ldmlr.py (digits, --smoke).

1. kill -9 inside a stage, then the same command again: the run resumes from the stage's last
   checkpoint and ends with the rows (diffult.py: and the generated images) of an uninterrupted
   run. The kill is a real SIGKILL, sent once the stage has written its first checkpoint or shard.
2. The same command twice from scratch gives the same rows.
3. A diverged loss stops the run with exit code 1 and one line, and keeps the last good
   checkpoint.
4. Bad input exits 2 with one line and no traceback, and loses nothing already finished.

The runs that items 1-3 compare are subprocesses with one thread each: a multi-threaded reduction
rounds differently with another thread count, so compared runs must agree on it, and the tiny
models gain nothing from a thread pool. Module fixtures run them two at a time, one per core, and
the tests check what they left. Most bad input goes to main(argv) in this process, the function
the command line runs (`sys.exit(main())`), to save a start-up per case: its return value is the
exit code, and a traceback would surface here as an exception. The ImageNet-LT list files go
through real subprocesses.
"""
import functools
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import diffult  # noqa: E402
import ldmlr  # noqa: E402
import lt_data  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1")
# Budgets just large enough that the stages under test run on for a while after their first
# checkpoint / shard, so that the kill lands inside them.
COMMANDS = {
    "diffult": [os.path.join(ROOT, "diffult.py"), "--dataset", "digits", "--smoke",
                "--diffusion-steps", "24", "--ckpt-every", "4", "--target-count", "60",
                "--gen-batch", "16"],
    "ldmlr": [os.path.join(ROOT, "ldmlr.py"), "--dataset", "digits", "--smoke", "--epochs", "4",
              "--diffusion-steps", "200", "--ckpt-every", "20"],
}
MODULES = {"diffult": diffult, "ldmlr": ldmlr}


# -------------------------------------------------------------------------------------------------
# Helpers


def cli(script, out, *extra):
    """Run the script's command (plus `extra` flags) on run directory `out` and wait for it."""
    return subprocess.run([sys.executable, *COMMANDS[script], "--out", out, *extra], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=600)


def in_process(script, out, extra, capsys):
    """main(argv) of the script in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = MODULES[script].main(COMMANDS[script][1:] + ["--out", out, *extra])
    printed = capsys.readouterr()
    return code, printed.out, printed.err


def side_by_side(jobs):
    """Run the jobs {name: function} two at a time (one per core): {name: what it returned}. An
    exception in a job is raised here, in the test or fixture that asked."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
    return {name: future.result() for name, future in futures.items()}


def kill_inside(script, out, marker):
    """Start the command and SIGKILL it as soon as `marker` (a path under `out`: the first
    checkpoint or shard of the stage under test) exists, i.e. while that stage is running."""
    path = os.path.join(out, marker)
    with open(out + ".killed.log", "w+") as err:
        proc = subprocess.Popen([sys.executable, *COMMANDS[script], "--out", out], cwd=ROOT,
                                env=ENV, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 600  # a hang guard, not a speed check
        while not os.path.exists(path):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                err.seek(0)
                raise AssertionError(f"{marker} never appeared (exit {proc.returncode}):\n"
                                     f"{err.read()[-3000:]}")
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL


def copy_stages_before(ref, out, script, stage):
    """A run directory holding run `ref`'s config.json and its stages before `stage`: the same
    command on it starts `stage` afresh and skips the earlier ones."""
    stages = MODULES[script].STAGES
    os.makedirs(out)
    shutil.copy(os.path.join(ref, "config.json"), out)
    for earlier in stages[:stages.index(stage)]:
        shutil.copytree(os.path.join(ref, earlier), os.path.join(out, earlier))


def kill_and_resume(script, ref, out, stage, marker):
    """Run the command on a copy of `ref`'s stages before `stage` (or from scratch if ref is
    None), kill it inside `stage`, note what the stage left on disk, and run the command again."""
    if ref is not None:
        copy_stages_before(ref, out, script, stage)
    kill_inside(script, out, marker)
    folder = os.path.join(out, stage)
    ckpt = os.path.join(folder, "ckpt.pt")
    left = types.SimpleNamespace(
        done=os.path.exists(os.path.join(folder, "done.json")),
        ckpt=diffult.load_checkpoint(ckpt) if os.path.exists(ckpt) else None,
        shards=sorted(f for f in os.listdir(folder) if f.startswith("shard_")))
    return types.SimpleNamespace(out=out, left=left, resumed=cli(script, out))


def rows(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)["rows"]


def shards(out):
    folder = os.path.join(out, "generate")
    return {f: diffult.load_checkpoint(os.path.join(folder, f))
            for f in sorted(os.listdir(folder)) if f.startswith("shard_")}


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def snapshot(out, stages):
    """{path: (size, mtime)} of every file in the given stage folders: equal snapshots mean
    nothing there was removed, rewritten or added."""
    found = {}
    for stage in stages:
        for folder, _, files in os.walk(os.path.join(out, stage)):
            for f in files:
                st = os.stat(os.path.join(folder, f))
                found[os.path.join(folder, f)] = (st.st_size, st.st_mtime_ns)
    return found


PROGRESS_BAR = re.compile(r"\| *\d+/\d+ \[")  # tqdm's "...| 3/40 [00:01<00:02, ...]"
STAGE_LOG = re.compile(r"\[(diffult|ldmlr)\] ")  # the stage log lines both scripts print


def error_line(stderr):
    """The one line a failed run prints. Besides it stderr may only hold progress bars and
    the scripts' stage log lines ('[diffult] ...', '[ldmlr] ...'): anything else, a traceback
    above all, fails."""
    assert "Traceback" not in stderr, stderr
    lines = [l for l in stderr.splitlines() if l.strip() and not STAGE_LOG.match(l)
             and not PROGRESS_BAR.search(l)]
    assert len(lines) == 1 and ": error: " in lines[0], stderr
    return lines[0]


def skipped(script, stdout, stderr):
    """The stages a run reported as finished before and skipped."""
    return [s for s in MODULES[script].STAGES if f"[{script}] {s}: done, skipped" in stderr]


@pytest.fixture
def one_thread():
    """In-process runs that train (the reruns after bad input) on one thread, like the
    subprocesses; restored afterwards for the rest of the suite."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def finish(script, out):
    r = cli(script, out)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """Per script, two uninterrupted runs of the same command from scratch: (reference, twin)."""
    base = tmp_path_factory.mktemp("refs")
    outs = {script: (str(base / f"{script}_ref"), str(base / f"{script}_twin"))
            for script in COMMANDS}
    side_by_side({out: functools.partial(finish, script, out)
                  for script, pair in outs.items() for out in pair})
    return outs


@pytest.fixture(scope="module")
def kills(refs, tmp_path_factory):
    """The kill -9 runs, each resumed by the same command: in diffult.py's diffusion and generate
    stages and ldmlr.py's diffusion stage (on copies of the reference's earlier stages), and in
    ldmlr.py's encoder, its first stage (from scratch)."""
    base = tmp_path_factory.mktemp("kills")
    cases = {"diffult diffusion": ("diffult", refs["diffult"][0], "diffusion", "diffusion/ckpt.pt"),
             "diffult generate": ("diffult", refs["diffult"][0], "generate",
                                  "generate/shard_00000.pt"),
             "ldmlr diffusion": ("ldmlr", refs["ldmlr"][0], "diffusion", "diffusion/ckpt.pt"),
             "ldmlr encoder": ("ldmlr", None, "encoder", "encoder/ckpt.pt")}
    return side_by_side({name: functools.partial(kill_and_resume, script, ref,
                                                 str(base / name.replace(" ", "_")), stage, marker)
                         for name, (script, ref, stage, marker) in cases.items()})


@pytest.fixture(scope="module")
def finished(refs, tmp_path_factory):
    """A copy of each finished twin run for the bad-flag tests to aim at: none may change it."""
    base = tmp_path_factory.mktemp("finished")
    copies = {script: str(base / script) for script in COMMANDS}
    for script, out in copies.items():
        shutil.copytree(refs[script][1], out)
    return copies


# -------------------------------------------------------------------------------------------------
# 1 and 2: kill -9 and resume; the same command twice


@pytest.mark.slow
@pytest.mark.parametrize("script", ["diffult", "ldmlr"])
def test_same_command_twice_from_scratch_gives_the_same_results(script, refs):
    results = []
    for out in refs[script]:
        with open(os.path.join(out, "results.json")) as f:
            results.append(json.load(f))
    assert results[0]["rows"] == results[1]["rows"]
    assert results[0]["generated"] == results[1]["generated"]


@pytest.mark.slow
def test_diffult_killed_in_diffusion_resumes_to_the_same_results(kills, refs):
    ref, k = refs["diffult"][0], kills["diffult diffusion"]
    assert not k.left.done and 0 < k.left.ckpt["step"] < 24  # killed inside the stage
    assert k.resumed.returncode == 0, k.resumed.stderr[-3000:]
    assert f"[diffult] diffusion: resuming at step {k.left.ckpt['step']}" in k.resumed.stderr
    assert skipped("diffult", k.resumed.stdout, k.resumed.stderr) == ["baseline"]
    a, b = (diffult.load_checkpoint(os.path.join(d, "diffusion", "ckpt.pt")) for d in (ref, k.out))
    assert a["step"] == b["step"] == 24 and same_weights(a["ema"], b["ema"])
    a, b = shards(ref), shards(k.out)
    assert list(a) == list(b)
    for name in a:  # image for image
        assert torch.equal(a[name]["images"], b[name]["images"]), name
    assert rows(k.out) == rows(ref)


@pytest.mark.slow
def test_diffult_killed_in_generate_resumes_to_the_same_images(kills, refs):
    ref, k = refs["diffult"][0], kills["diffult generate"]
    saved, total = len(k.left.shards), len(shards(ref))
    assert not k.left.done and 0 < saved < total
    assert k.resumed.returncode == 0, k.resumed.stderr[-3000:]
    assert f"generate: {saved} of {total} shards already saved, resuming" in k.resumed.stderr
    assert skipped("diffult", k.resumed.stdout, k.resumed.stderr) == ["baseline", "diffusion"]
    a, b = shards(ref), shards(k.out)
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name]["images"], b[name]["images"]), name
        assert torch.equal(a[name]["labels"], b[name]["labels"]), name
    assert rows(k.out) == rows(ref)


@pytest.mark.slow
def test_ldmlr_killed_in_diffusion_resumes_to_the_same_results(kills, refs):
    ref, k = refs["ldmlr"][0], kills["ldmlr diffusion"]
    assert not k.left.done and 0 < k.left.ckpt["step"] < 200
    assert k.resumed.returncode == 0, k.resumed.stderr[-3000:]
    assert f"[ldmlr] diffusion: resuming at step {k.left.ckpt['step']}" in k.resumed.stderr
    assert skipped("ldmlr", k.resumed.stdout, k.resumed.stderr) == ["encoder", "encode"]
    a, b = (diffult.load_checkpoint(os.path.join(d, "diffusion", "ckpt.pt")) for d in (ref, k.out))
    assert same_weights(a["ema"], b["ema"]) and same_weights(a["model"], b["model"])
    assert rows(k.out) == rows(ref)


@pytest.mark.slow
def test_ldmlr_killed_in_the_encoder_resumes_to_the_same_rows(kills, refs):
    k = kills["ldmlr encoder"]
    epochs_done = k.left.ckpt["epoch"] + 1
    assert not k.left.done and epochs_done < 4
    assert k.resumed.returncode == 0, k.resumed.stderr[-3000:]
    assert f"[ldmlr] stage-1: resuming after {epochs_done} of 4 epochs" in k.resumed.stderr
    assert rows(k.out) == rows(refs["ldmlr"][0])


# -------------------------------------------------------------------------------------------------
# 3: a diverged loss

LR_FLAG = {"diffult": "--diffusion-lr", "ldmlr": "--diffusion-lr"}
# An absurd learning rate: Adam's first update moves every weight by ~1e20 and the next loss
# overflows. A checkpoint every step, so that there is one from before the divergence to keep.
DIVERGE = ["--redo", "diffusion", "--ckpt-every", "1"]


@pytest.fixture(scope="module")
def diverged(refs, tmp_path_factory):
    """Per script: a copy of the reference run, and the command that made its diffusion diverge."""
    base = tmp_path_factory.mktemp("diverged")

    def job(script):
        out = str(base / script)
        shutil.copytree(refs[script][0], out)
        return out, cli(script, out, *DIVERGE, LR_FLAG[script], "1e20")
    return side_by_side({script: functools.partial(job, script) for script in COMMANDS})


@pytest.mark.slow
@pytest.mark.parametrize("script, first_stage", [("diffult", "baseline"), ("ldmlr", "encoder")])
def test_diverged_diffusion_stops_with_one_line_and_keeps_the_last_good_checkpoint(
        script, first_stage, diverged):
    out, r = diverged[script]
    assert r.returncode == 1, r.stderr[-3000:]
    line = error_line(r.stderr)
    ckpt_path = os.path.join(out, "diffusion", "ckpt.pt")
    assert re.search(r"diffusion: loss became (nan|inf|-inf)", line) and ckpt_path in line, line
    diverged_at = int(re.search(r"step (\d+)", line).group(1))

    ckpt = diffult.load_checkpoint(ckpt_path)
    assert 1 <= ckpt["step"] < diverged_at
    for key in ("model", "ema"):
        assert all(torch.isfinite(v).all() for v in ckpt[key].values()), key
    cfg = MODULES[script].parse_config(COMMANDS[script][1:] + ["--out", out, *DIVERGE,
                                                               LR_FLAG[script], "1e20"])
    if script == "diffult":
        model = diffult.make_unet(cfg, types.SimpleNamespace(num_classes=10, channels=1))
    else:
        model = ldmlr.Denoiser(len(ckpt["mu"]), 10, cfg.denoiser_width, cfg.denoiser_blocks)
    model.load_state_dict(ckpt["ema"])  # the kept checkpoint is a usable model
    assert not os.path.exists(os.path.join(out, "diffusion", "done.json"))
    assert os.path.exists(os.path.join(out, first_stage, "done.json"))


def overflow_after(monkeypatch, n_updates):
    """Make the n-th Adam update turn one weight into inf, as an overflowing update would: the
    loss of that step was computed before it, and is finite."""
    real_step, count = torch.optim.Adam.step, [0]

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        count[0] += 1
        if count[0] == n_updates:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out
    monkeypatch.setattr(torch.optim.Adam, "step", step)


def test_ldmlr_weights_that_overflow_at_a_checkpoint_are_not_saved(tmp_path, monkeypatch,
                                                                     one_thread):
    g = torch.Generator().manual_seed(0)
    os.makedirs(tmp_path / "encode")
    ldmlr.save(str(tmp_path / "encode" / "features.pt"),
               train={"features": torch.relu(torch.randn(60, 8, generator=g)),
                      "labels": torch.arange(60) % 3})
    cfg = ldmlr.parse_config(["--dataset", "digits", "--smoke", "--out", str(tmp_path),
                              "--diffusion-steps", "30", "--ckpt-every", "10"])
    overflow_after(monkeypatch, 20)  # the update of step 20, whose checkpoint comes next
    with pytest.raises(FloatingPointError, match="weights became non-finite"):
        ldmlr.stage_diffusion(cfg, types.SimpleNamespace(num_classes=3), torch.device("cpu"))
    ckpt = diffult.load_checkpoint(str(tmp_path / "diffusion" / "ckpt.pt"))
    assert ckpt["step"] == 10
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_diffult_weights_that_overflow_at_a_checkpoint_are_not_saved(tmp_path, monkeypatch,
                                                                       one_thread):
    cfg = diffult.parse_config(["--dataset", "digits", "--smoke", "--out", str(tmp_path),
                                "--aid-alpha", "0"])  # 6 steps, a checkpoint every 3; no phi
    data = lt_data.load_dataset("digits", imb=cfg.imb, seed=0)
    os.makedirs(tmp_path / "baseline")
    diffult.save(str(tmp_path / "baseline" / "stats.pt"), centres=torch.zeros(10, 64),
                 radii=torch.ones(10))
    overflow_after(monkeypatch, 6)
    with pytest.raises(FloatingPointError, match="weights became non-finite"):
        diffult.stage_diffusion(cfg, data, torch.device("cpu"))
    ckpt = diffult.load_checkpoint(str(tmp_path / "diffusion" / "ckpt.pt"))
    assert ckpt["step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


# -------------------------------------------------------------------------------------------------
# 4: bad input. Each case: exit 2, one line, and the finished stages untouched and still skipped.

BAD_FLAGS = [  # (script, flags, what the line must say); comment: what a fresh run did before
    ("diffult", ["--lr", "-1"], "--lr"),                        # SGD's ValueError, a traceback
    ("diffult", ["--seed", "-1"], "--seed"),                    # numpy's ValueError, a traceback
    ("diffult", ["--weight-decay", "-1"], "--weight-decay"),    # SGD's ValueError, a traceback
    ("diffult", ["--unet-dropout", "1.5"], "--unet-dropout"),   # nn.Dropout's ValueError
    ("diffult", ["--synthetic-weight", "inf"], "--synthetic-weight"),  # exit 1, "diverged"
    ("diffult", ["--dataset", "mnist"], "--dataset"),
    ("diffult", ["--imb", "10"], "another config (imb"),
    ("ldmlr", ["--ratio", "nan"], "--ratio"),                   # round(nan): a traceback
    ("ldmlr", ["--lr", "nan"], "--lr"),                         # exit 1, "diverged"
    ("ldmlr", ["--la-tau", "inf"], "--la-tau"),                 # accepted: rows of inf logits
    ("ldmlr", ["--workers", "-1"], "--workers"),                # accepted
    ("ldmlr", ["--diffusion-steps", "100"], "another config (diffusion_steps"),
]


@pytest.mark.slow
@pytest.mark.parametrize("script, flags, says", BAD_FLAGS,
                         ids=[f"{s}{''.join(f)}" for s, f, _ in BAD_FLAGS])
def test_bad_flag_or_other_config_exits_2_and_loses_nothing(script, flags, says, finished,
                                                            capsys):
    out = finished[script]
    stages = MODULES[script].STAGES
    before = snapshot(out, stages)
    code, _, err = in_process(script, out, flags, capsys)
    assert code == 2
    assert says in error_line(err)
    assert snapshot(out, stages) == before
    code, printed, err = in_process(script, out, [], capsys)  # the good command: nothing to do
    assert code == 0 and skipped(script, printed, err) == stages
    assert snapshot(out, stages) == before


def test_out_that_is_a_file_exits_2(tmp_path, capsys):
    path = tmp_path / "results.txt"
    path.write_text("keep me\n")
    code, _, err = in_process("ldmlr", str(path), [], capsys)
    assert code == 2 and "is a file" in error_line(err)
    assert path.read_text() == "keep me\n"


@pytest.mark.parametrize("script", ["diffult", "ldmlr"])
def test_missing_cifar_exits_2_and_says_how_to_get_it(script, tmp_path, capsys):
    out = str(tmp_path / "run")
    code, _, err = in_process(script, out, ["--dataset", "cifar100", "--data-root",
                                            str(tmp_path / "data"), "--no-download"], capsys)
    line = error_line(err)
    assert code == 2 and "cifar-100-python" in line and "--no-download" in line
    assert not os.path.exists(out)  # a run that cannot start leaves no directory behind


@pytest.mark.slow
@pytest.mark.parametrize("script, bad_line, says", [
    ("diffult", "train/n0/a.JPEG", "line 2: expected 'relative/path.JPEG label'"),
    ("ldmlr", "train/n0/a.JPEG 1000", "line 2: label 1000 outside 0..999")])
def test_malformed_imagenet_lt_list_exits_2_through_the_cli(script, bad_line, says, tmp_path):
    from PIL import Image
    root = tmp_path / "imagenet"
    (root / "train" / "n0").mkdir(parents=True)
    Image.new("RGB", (12, 10), (200, 30, 30)).save(root / "train" / "n0" / "a.JPEG", "JPEG")
    (root / "ImageNet_LT_train.txt").write_text(f"train/n0/a.JPEG 0\n{bad_line}\n")
    (root / "ImageNet_LT_test.txt").write_text("train/n0/a.JPEG 0\n")
    r = subprocess.run([sys.executable, os.path.join(ROOT, f"{script}.py"), "--dataset",
                        "imagenet_lt", "--smoke", "--data-root", str(root), "--out",
                        str(tmp_path / "run")], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 2
    line = error_line(r.stderr)
    assert "ImageNet_LT_train.txt" in line and says in line, line


@pytest.mark.slow
def test_unreadable_image_read_by_a_dataloader_worker_exits_2_with_one_line(tmp_path):
    """A BadInput raised inside a DataLoader worker reaches main() wrapped in the worker's
    traceback; the user still sees one line."""
    from PIL import Image
    root = tmp_path / "imagenet"
    (root / "train" / "n0").mkdir(parents=True)
    Image.new("RGB", (12, 10), (200, 30, 30)).save(root / "train" / "n0" / "a.JPEG", "JPEG")
    (root / "train" / "n0" / "b.JPEG").write_bytes(b"not a jpeg")
    (root / "ImageNet_LT_train.txt").write_text("train/n0/a.JPEG 0\ntrain/n0/b.JPEG 1\n")
    (root / "ImageNet_LT_test.txt").write_text("train/n0/a.JPEG 0\n")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "ldmlr.py"), "--dataset",
                        "imagenet_lt", "--smoke", "--workers", "1", "--batch-size", "2",
                        "--data-root", str(root), "--out", str(tmp_path / "run")], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr[-3000:]
    line = error_line(r.stderr)
    assert line.startswith("ldmlr.py: error: cannot read image") and "b.JPEG" in line, line


def as_if_killed_in(out, script, stage):
    """Make a finished run directory look like one killed inside `stage` after a checkpoint: the
    stage's done.json and every later stage gone, its checkpoint kept."""
    stages = MODULES[script].STAGES
    os.remove(os.path.join(out, stage, "done.json"))
    for later in stages[stages.index(stage) + 1:]:
        shutil.rmtree(os.path.join(out, later))
    os.remove(os.path.join(out, "results.json"))


@pytest.mark.slow
def test_bad_diffusion_checkpoint_exits_2_naming_the_file_and_redo_recovers(refs, tmp_path,
                                                                           capsys, one_thread):
    out = str(tmp_path / "run")
    shutil.copytree(refs["diffult"][0], out)
    as_if_killed_in(out, "diffult", "diffusion")
    ckpt = os.path.join(out, "diffusion", "ckpt.pt")
    with open(ckpt, "rb") as f:
        good = f.read()
    before = snapshot(out, ["baseline"])

    def truncated():
        with open(ckpt, "wb") as f:
            f.write(good[:len(good) // 2])

    def foreign_bytes():
        with open(ckpt, "w") as f:
            f.write("step,loss\n1,0.9\n")

    def another_stages_checkpoint():  # a valid checkpoint, but the classifier's
        shutil.copy(os.path.join(out, "baseline", "ckpt.pt"), ckpt)

    def another_models_checkpoint():  # the right entries, but one tensor of another size
        state = torch.load(io.BytesIO(good), weights_only=False)
        name = next(iter(state["model"]))
        state["model"][name] = torch.zeros(3, *state["model"][name].shape[1:])
        torch.save(state, ckpt)

    for damage in (truncated, foreign_bytes, another_stages_checkpoint, another_models_checkpoint):
        damage()
        code, _, err = in_process("diffult", out, [], capsys)  # the same command: resume
        line = error_line(err)
        assert code == 2 and ckpt in line and "--redo diffusion" in line, (damage, line)
        assert snapshot(out, ["baseline"]) == before

    code, printed, err = in_process("diffult", out, ["--redo", "diffusion"], capsys)
    assert code == 0, err[-3000:]
    assert skipped("diffult", printed, err) == ["baseline"]
    assert snapshot(out, ["baseline"]) == before


@pytest.mark.slow
def test_truncated_feature_file_exits_2_naming_it_and_redo_recovers(refs, tmp_path, capsys,
                                                                    one_thread):
    out = str(tmp_path / "run")
    shutil.copytree(refs["ldmlr"][0], out)
    path = os.path.join(out, "encode", "features.pt")
    with open(path, "r+b") as f:
        f.truncate(1000)
    before = snapshot(out, ["encoder"])
    code, _, err = in_process("ldmlr", out, ["--redo", "diffusion"], capsys)
    line = error_line(err)
    assert code == 2 and path in line and "--redo encode" in line, line
    assert snapshot(out, ["encoder"]) == before
    code, printed, err = in_process("ldmlr", out, ["--redo", "encode"], capsys)
    assert code == 0, err[-3000:]
    assert skipped("ldmlr", printed, err) == ["encoder"]


@pytest.mark.slow
def test_generated_shard_of_another_shape_dtype_or_labels_exits_2(refs, tmp_path, capsys,
                                                                  one_thread):
    out = str(tmp_path / "run")
    shutil.copytree(refs["diffult"][0], out)
    path = os.path.join(out, "generate", "shard_00001.pt")
    shard = diffult.load_checkpoint(path)
    x, y = shard["images"], shard["labels"]
    before = snapshot(out, ["baseline", "diffusion"])
    bad_labels = y.clone()
    bad_labels[3] = 10  # digits has classes 0..9
    for bad, says in (
            ({"images": x.repeat(1, 3, 1, 1), "labels": y}, "this run generates uint8"),
            ({"images": x.float() / 255, "labels": y}, "torch.float32"),
            ({"images": x, "labels": bad_labels}, "labels outside 0..9"),
            ({"images": x, "labels": y.flip(0)}, "generation plan")):
        torch.save(bad, path)
        code, _, err = in_process("diffult", out, ["--redo", "filter"], capsys)
        line = error_line(err)
        assert code == 2 and path in line and says in line and "--redo generate" in line, line
        assert snapshot(out, ["baseline", "diffusion"]) == before

    code, printed, err = in_process("diffult", out, ["--redo", "generate"], capsys)
    assert code == 0, err[-3000:]
    assert skipped("diffult", printed, err) == ["baseline", "diffusion"]
    assert torch.equal(diffult.load_checkpoint(path)["images"], x)  # regenerated as before


@pytest.mark.slow
def test_pseudo_features_of_another_size_or_labels_exit_2(refs, tmp_path, capsys, one_thread):
    out = str(tmp_path / "run")
    shutil.copytree(refs["ldmlr"][0], out)
    path = os.path.join(out, "generate", "pseudo.pt")
    pseudo = diffult.load_checkpoint(path)
    feats, labels = pseudo["features"], pseudo["labels"]
    before = snapshot(out, ["encoder", "encode", "diffusion"])
    bad_labels = labels.clone()
    bad_labels[0] = -1
    for bad, says in (
            (dict(pseudo, features=feats[:, :32]), "the encoder's are float (N, 64)"),
            (dict(pseudo, features=feats.long()), "torch.int64"),
            (dict(pseudo, labels=bad_labels), "labels outside 0..9"),
            (dict(pseudo, labels=torch.zeros_like(labels)), "per-class counts")):
        torch.save(bad, path)
        code, _, err = in_process("ldmlr", out, ["--redo", "finetune"], capsys)
        line = error_line(err)
        assert code == 2 and path in line and says in line and "--redo generate" in line, line
        assert snapshot(out, ["encoder", "encode", "diffusion"]) == before

    code, printed, err = in_process("ldmlr", out, ["--redo", "generate"], capsys)
    assert code == 0, err[-3000:]
    assert skipped("ldmlr", printed, err) == ["encoder", "encode", "diffusion"]
