"""run_all.sh: the command chain, the failure report and the results table."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_all(tmp_path, *args, **env):
    full_env = dict(os.environ, OUT=str(tmp_path / "runs"), PYTHON=sys.executable,
                    LAUNCHER=sys.executable, **env)
    return subprocess.run(["bash", os.path.join(ROOT, "run_all.sh"), *args], env=full_env,
                          capture_output=True, text=True, timeout=900)


def test_dry_run_lists_every_command(tmp_path):
    r = run_all(tmp_path, "--dry-run", IMAGENET_ROOT=str(tmp_path / "none"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 * 2 * 3  # methods x datasets x ratios, no ImageNet-LT lists here
    assert all("--seed 0" in l for l in lines)
    assert any("ldmlr.py --dataset cifar100 --imb 50" in l for l in lines)
    assert not (tmp_path / "runs").exists()  # a dry run runs nothing


def test_dry_run_adds_imagenet_when_lists_exist(tmp_path):
    (tmp_path / "inet").mkdir()
    (tmp_path / "inet" / "ImageNet_LT_train.txt").write_text("a.JPEG 0\n")
    r = run_all(tmp_path, "--dry-run", "--methods", "ldmlr",
                IMAGENET_ROOT=str(tmp_path / "inet"))
    assert sum("--dataset imagenet_lt" in l for l in r.stdout.splitlines()) == 1


def test_bad_flag_exits_2(tmp_path):
    r = run_all(tmp_path, "--bogus")
    assert r.returncode == 2 and "unknown argument" in r.stderr


@pytest.mark.slow
def test_digits_smoke_chain_reports_failure_and_table(tmp_path):
    # imb 0.5 is bad input: that run fails (exit 2), the chain goes on, and reports it at the end.
    r = run_all(tmp_path, DATASETS="digits", RATIOS="0.5 20", SEEDS="0", EXTRA="--smoke")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "2 run(s) failed" in r.stderr and "--imb 0.5" in r.stderr
    table = (tmp_path / "runs" / "results_table.md").read_text()
    header = table.splitlines()[0]
    assert "digits r=20" in header
    for method, row in (("diffult", "DiffuLT"), ("ldmlr", "CE+LDMLR"), ("ldmlr", "cRT"),
                        ("diffult", "CE"), ("diffult", "LA")):
        line = next(l for l in table.splitlines() if l.startswith(f"| {method} | {row} |"))
        value = float(line.split("|")[3].strip())
        result = json.loads((tmp_path / "runs" / f"{method}_digits_imb20_seed0" /
                             "results.json").read_text())
        assert value == pytest.approx(result["rows"][row]["overall"], abs=0.005)
