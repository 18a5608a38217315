"""What diffult.py and ldmlr.py share: the pieces each carries as an identical copy, the stage-1
learning-rate schedule, and the plumbing (atomic files, checkpoints, run directories, flags)."""
import inspect
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import diffult  # noqa: E402
import ldmlr  # noqa: E402
from lt_data import BadInput  # noqa: E402

MODULES = [diffult, ldmlr]
# Each script stands alone; where both do the same job the code is the same, letter for letter.
SHARED = ["BasicBlock", "ResNet32", "TorchvisionResNet", "make_classifier", "timestep_embedding",
          "_at", "q_sample", "ddim_step", "lr_at", "augment", "normalise", "batches", "predict",
          "parse_config", "ArgParser", "flag", "log", "seed_of", "rng", "in_memory", "rank",
          "world", "barrier", "setup", "use_bf16", "autocast", "place", "for_training",
          "atomic_write", "save", "save_json", "load_checkpoint", "resume", "check_finite",
          "read_done", "check_run_dir", "load_data", "run_stages", "main"]


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
