"""What diffult.py and ldmlr.py share: the pieces each carries as an identical copy, the stage-1
learning-rate schedule, and the plumbing (atomic files, checkpoints, run directories, flags)."""
import inspect
import os
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import diffult  # noqa: E402
import ldmlr  # noqa: E402
import lt_data  # noqa: E402
from lt_data import BadInput  # noqa: E402

MODULES = [diffult, ldmlr]
# Each script stands alone; where both do the same job the code is the same, letter for letter.
SHARED = ["BasicBlock", "ResNet32", "TorchvisionResNet", "make_classifier", "timestep_embedding",
          "_at", "q_sample", "ddim_step", "lr_at", "augment", "normalise", "batches", "predict",
          "parse_config", "ArgParser", "flag", "log", "seed_of", "rng", "in_memory", "rank",
          "world", "barrier", "setup", "use_bf16", "autocast", "place", "for_training",
          "atomic_write", "save", "save_json", "load_checkpoint", "resume", "check_finite",
          "read_done", "check_run_dir", "load_data", "run_stages", "projection", "peak_memory",
          "estimate", "main"]


@pytest.mark.parametrize("name", SHARED)
def test_shared_pieces_are_identical_copies(name):
    assert inspect.getsource(getattr(diffult, name)) == inspect.getsource(getattr(ldmlr, name))


@pytest.mark.parametrize("mod", MODULES)
def test_stage1_schedule_is_ldam_drws(mod):
    # LDAM-DRW's adjust_learning_rate at the 1-based epochs 1, 5, 6, 160, 161, 180, 181 of 200
    cfg = mod.parse_config(["--dataset", "cifar100"])
    lrs = [mod.lr_at(e - 1, cfg) for e in (1, 5, 6, 160, 161, 180, 181)]
    assert lrs == pytest.approx([0.02, 0.1, 0.1, 0.1, 0.001, 0.001, 1e-5], rel=1e-12)


@pytest.mark.parametrize("mod", MODULES)
def test_checkpoint_save_and_corrupt_file(mod, tmp_path):
    path = str(tmp_path / "ckpt.pt")
    mod.save(path, step=3)
    assert mod.load_checkpoint(path)["step"] == 3
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary left behind
    with open(path, "r+b") as f:
        f.truncate(10)
    with pytest.raises(BadInput, match="corrupt"):
        mod.load_checkpoint(path)
    torch.save([1, 2], path)  # a valid torch file, but not one of ours
    with pytest.raises(BadInput, match="not one of ours"):
        mod.load_checkpoint(path)


@pytest.mark.parametrize("mod", MODULES)
def test_load_checkpoint_into_modules_and_a_state_that_does_not_fit(mod, tmp_path):
    path = str(tmp_path / "stage" / "ckpt.pt")
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(net.parameters())
    mod.save(path, model=net.state_dict(), optimizer=opt.state_dict(), step=7)
    fresh = torch.nn.Linear(4, 3)
    assert mod.resume(path, {"model": fresh}, "step", 0) == 7
    assert torch.equal(fresh.weight, net.weight)
    assert mod.resume(str(tmp_path / "none.pt"), {"model": fresh}, "step", 0) == 0
    wider = torch.nn.Linear(4, 5)  # a differently sized model
    with pytest.raises(BadInput, match=r"'model' does not fit .*size mismatch.*--redo stage$"):
        mod.load_checkpoint(path, into={"model": wider})
    other = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 3))
    with pytest.raises(BadInput, match="'optimizer' does not fit"):  # another parameter count
        mod.load_checkpoint(path, into={"optimizer": torch.optim.Adam(other.parameters())})
    with pytest.raises(BadInput, match="not one of ours.*'ema'"):  # an entry it does not hold
        mod.load_checkpoint(path, into={"ema": fresh})


@pytest.mark.parametrize("mod", MODULES)
def test_a_failed_save_keeps_the_old_file(mod, tmp_path):
    path = str(tmp_path / "x.pt")
    mod.save(path, v=1)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        mod.save(path, v=Unpicklable())
    assert mod.load_checkpoint(path)["v"] == 1
    assert os.listdir(tmp_path) == ["x.pt"]


@pytest.mark.parametrize("mod", MODULES)
def test_check_run_dir(mod, tmp_path):
    out = str(tmp_path / "run")
    first_redo = mod.STAGES[2]  # a stage with fields of its own in REDO_FIELDS
    field = mod.REDO_FIELDS[first_redo][0]

    def cfg(*flags):
        return mod.parse_config(["--smoke", "--out", out, *flags])
    mod.check_run_dir(cfg("--device", "cpu"))
    assert os.path.isfile(os.path.join(out, "config.json"))
    mod.check_run_dir(cfg("--device", "cuda"))  # not a field that changes results
    with pytest.raises(BadInput, match="another config .imb"):
        mod.check_run_dir(cfg("--imb", "50"))
    changed = cfg("--redo", first_redo)
    setattr(changed, field, "changed")
    os.makedirs(os.path.join(out, first_redo))
    mod.check_run_dir(changed)  # a field only the redone stages read may change ...
    assert not os.path.exists(os.path.join(out, first_redo))  # ... and those stages are cleared
    with pytest.raises(BadInput, match="imb"):  # the others still may not
        mod.check_run_dir(cfg("--redo", first_redo, "--imb", "50"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "file.txt").write_text("x")
    with pytest.raises(BadInput, match="not empty"):
        mod.check_run_dir(mod.parse_config(["--out", str(other)]))


@pytest.mark.parametrize("mod", MODULES)
def test_bool_flags_take_the_no_form_and_help_names_every_field(mod, capsys):
    assert mod.parse_config([]).download is True
    assert mod.parse_config(["--no-download"]).download is False
    assert mod.parse_config(["--compile"]).compile is True
    with pytest.raises(SystemExit):
        mod.parse_config(["--help"])
    shown = capsys.readouterr().out
    for f in mod.dataclasses.fields(mod.Config):
        assert mod.flag(f.name) in shown, f.name
    for stage, names in mod.REDO_FIELDS.items():
        assert stage in mod.STAGES and set(names) <= {f.name for f in
                                                      mod.dataclasses.fields(mod.Config)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("mod", MODULES)
def test_asking_for_an_absent_device_is_bad_input(mod):
    with pytest.raises(BadInput, match="--device cuda"):
        mod.setup(mod.parse_config(["--device", "cuda"]))


# ---- --estimate ---------------------------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(t1=st.floats(0.01, 100), dt=st.floats(0.01, 100), w1=st.integers(1, 10 ** 6),
       dw=st.integers(1, 10 ** 6), full=st.integers(0, 10 ** 12))
def test_projection_takes_the_rate_from_the_difference_of_two_budgets(t1, dt, w1, dw, full):
    for mod in MODULES:
        rate, seconds = mod.projection(t1, w1, t1 + dt, w1 + dw, full)
        assert rate == pytest.approx(dw / dt)
        assert seconds == pytest.approx(full * dt / dw)
        # noise that makes the larger budget no slower: the larger run's mean rate instead
        rate, seconds = mod.projection(t1 + dt, w1, t1, w1 + dw, full)
        assert rate == pytest.approx((w1 + dw) / t1)


@pytest.mark.parametrize("mod", MODULES)
def test_probe_budgets_grow_with_n_and_project_the_configured_work(mod):
    cfg = mod.parse_config(["--dataset", "cifar100"])
    data, counts = lt_data.random_data("cifar100", 100, 3)
    assert sum(counts) == 10847 and len(data.train) == 300
    for stage in mod.STAGES:
        one, two = (mod.probe(cfg, data, counts, stage, n, torch.device("cpu")) for n in (1, 2))
        assert one[1] <= two[1] and one[2] == two[2] > 0 and one[3] == two[3]
    changes, _, full, _ = mod.probe(cfg, data, counts, mod.STAGES[0], 2, torch.device("cpu"))
    assert changes["epochs"] == 2 and full == 200 * 10847  # 200 epochs of CIFAR-100-LT r=100


@pytest.mark.slow
@pytest.mark.parametrize("script", ["diffult", "ldmlr"])
def test_estimate_prints_every_stage_and_writes_nothing(script, tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, f"{script}.py"), "--estimate",
                        "--out", str(tmp_path / "run")], capture_output=True, text=True,
                       cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[2:]}
    assert set(rows) == set(getattr(sys.modules[script], "STAGES")) | {"total"}, r.stdout
    for stage in sys.modules[script].STAGES:
        assert float(rows[stage][1].replace(",", "")) > 0  # throughput
        assert re.fullmatch(r"\d+:\d\d:\d\d", rows[stage][3]) and rows[stage][-1] == "GiB"
    assert os.listdir(tmp_path) == []  # no run directory, no runs/


@pytest.mark.parametrize("mod", MODULES)
def test_estimate_under_torchrun_is_refused_with_one_line(mod, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets for each of its processes
    with pytest.raises(BadInput, match="not torchrun"):
        mod.estimate(mod.parse_config(["--estimate"]))
