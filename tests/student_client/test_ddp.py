"""DDP with two ranks under torchrun (gloo): each rank draws its own shard of ids."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lyceum.deploy.examples import digits
from tests._support.teachers import make_dump

pytestmark = pytest.mark.integration

TRAIN_KWARGS: dict[str, object] = {
    "split": "train",
    "limit": 640,
}  # even: DistributedSampler pads nothing


def test_two_ranks_see_each_id_once_per_epoch(tmp_path: Path) -> None:
    train_set = digits("train", limit=640)
    dump = make_dump(tmp_path / "dump", seed=0, dataset=train_set)
    config = {
        "model": "lyceum.deploy.examples:student_mlp",
        "dataset": {
            "train": "lyceum.deploy.examples:digits",
            "train_kwargs": TRAIN_KWARGS,
            "validation": "lyceum.deploy.examples:digits",
            "validation_kwargs": {"split": "val"},
        },
        "teachers": {"dump": {"dir": str(dump)}},
        "losses": {"terms": [{"name": "kd", "kind": "soft_label", "field": "logits"}]},
        "epochs": 2,
        "batch_size": 32,
        "checkpoint_dir": str(tmp_path / "ckpt"),
        "progress": False,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc-per-node",
        "2",
        str(Path(__file__).with_name("ddp_worker.py")),
        str(path),
        str(tmp_path),
    ]
    # A new session: on a timeout the whole group (torchrun and its ranks) is killed.
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for epoch in range(2):
        per_rank = [[i for e, ids in r["seen"] if e == epoch for i in ids] for r in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == 320
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == list(range(640))
    # The ranks trained one model: DDP kept their weights equal, so their accuracy is equal.
    assert ranks[0]["accuracy"] == ranks[1]["accuracy"]
    assert (tmp_path / "ckpt" / "epoch-002.pt").is_file()
