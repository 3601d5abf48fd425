"""`tinylab train --backend trl` in two processes on this CPU, under torchrun and accelerate launch.

Each run: the tiny-cpu preset (tiny_model("llama"), no network), 2 steps, on a task written here
whose reward differs within every group (a random model earns nothing on the built-in tasks).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from testkit import DISTINCT_TASK_SOURCE

from tinylab import load_adapter
from tinylab.model.tiny import tiny_model

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LAUNCHERS = {
    "torchrun": [str(BIN / "torchrun"), "--nproc_per_node", "2"],
    "accelerate": [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "configs" / "multi-cpu.yaml")],
}
LINE = re.compile(r"tinylab train: rank (\d+) of (\d+), writes (\S+): vector (\[[^\]]*\])")


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_train_one_vector_and_rank_0_writes(tmp_path, launcher):
    (tmp_path / "distinct_task.py").write_text(DISTINCT_TASK_SOURCE)
    out = tmp_path / "out"
    cmd = [*LAUNCHERS[launcher], "-m", "tinylab.cli", "train", "--preset", "tiny-cpu", "--backend", "trl",
           "--out", str(out), f"task={tmp_path / 'distinct_task.py'}:Distinct", "steps=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = {int(r): (int(w), writes, json.loads(v)) for r, w, writes, v in LINE.findall(done.stderr)}
    assert sorted(ranks) == [0, 1], done.stderr[-3000:]
    assert [ranks[r][0] for r in (0, 1)] == [2, 2]  # both ranks see world size 2
    assert ranks[0][1] == str(out) and ranks[1][1] == "nothing"  # only rank 0 writes
    vector = ranks[0][2]
    assert ranks[1][2] == vector and any(x != 0 for x in vector)  # one vector, changed from zero
    assert sorted(p.name for p in out.iterdir()) == ["adapter.tlra", "comparison.csv", "comparison.json",
                                                      "comparison.txt", "config.json", "history.csv"]
    config = json.loads((out / "config.json").read_text())
    assert (config["world_size"], config["backend"], config["training"]["steps"]) == (2, "trl", 2)
    assert len((out / "history.csv").read_text().strip().splitlines()) == 1 + 2  # header + 2 steps
    model, _ = tiny_model("llama")
    adapter = load_adapter(model, out / "adapter.tlra")
    assert torch.allclose(adapter.vector(), torch.tensor(vector))
