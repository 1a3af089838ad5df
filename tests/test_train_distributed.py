"""The main job data-parallel: `torchrun --standalone --nproc-per-node 2 -m fusedopt train
--distributed --device cpu --json`, shortened (fewer epochs) to bound its time."""

import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun():
    path = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return path if os.path.exists(path) else shutil.which("torchrun")


@pytest.mark.skipif(torchrun() is None, reason="torchrun is not installed")
def test_torchrun_two_ranks_trains_and_shards_the_state():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [torchrun(), "--standalone", "--nproc-per-node", "2", "-m", "fusedopt", "train",
           "--distributed", "--device", "cpu", "--json", "--epochs", "8", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, done.stdout  # rank 0 only
    result = json.loads(lines[0])
    assert result["world_size"] == 2 and result["backend"] == "gloo"
    assert result["test_accuracy"] >= 0.93
    per_rank = result["state_bytes_per_rank"]
    assert sum(per_rank) == result["state_bytes_one_process"]
    assert max(per_rank) - min(per_rank) <= 2 * 4  # Adam: two float32 slots, +-1 element


def test_distributed_outside_torchrun_is_a_usage_error():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = ROOT
    done = subprocess.run([sys.executable, "-m", "fusedopt", "train", "--distributed",
                           "--device", "cpu"], capture_output=True, text=True, timeout=120,
                          env=env, cwd=ROOT)
    assert done.returncode == 2
    assert "torchrun" in done.stderr
