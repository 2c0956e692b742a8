"""DDP and FSDP with two ranks under torchrun (gloo): each rank draws its own shard of ids;
FSDP trains as DDP does and the two read each other's checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lyceum.deploy.examples import digits
from tests._support.students import supervised_config
from tests._support.teachers import make_dump
from tests._support.trainers import torchrun, write_config

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
    returncode, output = torchrun(
        Path(__file__).with_name("ddp_worker.py"), str(path), str(tmp_path)
    )
    assert returncode == 0, output[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for epoch in range(2):
        per_rank = [[i for e, ids in r["seen"] if e == epoch for i in ids] for r in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == 320
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == list(range(640))
    # The ranks trained one model: DDP kept their weights equal, so their accuracy is equal.
    assert ranks[0]["accuracy"] == ranks[1]["accuracy"]
    assert (tmp_path / "ckpt" / "epoch-002.pt").is_file()


@pytest.mark.slow
def test_fsdp_trains_as_ddp_and_resumes_its_checkpoints(tmp_path: Path) -> None:
    """Two ranks, each 10 batches of 32 an epoch, in groups of 3 (the last of 1), clipped:
    FSDP's weights and optimizer state (gathered, keyed as DDP's) equal DDP's, epoch by
    epoch, and FSDP resuming DDP's first epoch ends where DDP did."""
    config = {
        **supervised_config(tmp_path / "unused"),
        "dataset": {
            "train": "lyceum.deploy.examples:digits",
            "train_kwargs": TRAIN_KWARGS,
            "validation": "lyceum.deploy.examples:digits",
            "validation_kwargs": {"split": "val"},
        },
        "batch_size": 32,
        "accumulate": 3,
        "clip_grad_norm": 0.5,
        "schedule": {"name": "cosine"},
    }
    path = write_config(tmp_path / "cfg.yaml", config)
    worker = Path(__file__).with_name("fsdp_worker.py")
    returncode, output = torchrun(worker, str(path), str(tmp_path))
    assert returncode == 0, output[-4000:]

    def read(run: str, name: str) -> dict[str, Any]:
        state: dict[str, Any] = torch.load(tmp_path / run / name, weights_only=True)
        return state

    for name in ("epoch-001.pt", "last.pt"):
        want = read("ddp", name)
        for run in ("fsdp", "resumed") if name == "last.pt" else ("fsdp",):
            got = read(run, name)
            assert got["loader"] == want["loader"]
            assert got["scheduler"] == want["scheduler"]
            torch.testing.assert_close(got["model"], want["model"], rtol=1e-5, atol=1e-6)
            assert got["optimizer"]["param_groups"] == want["optimizer"]["param_groups"]
            torch.testing.assert_close(
                got["optimizer"]["state"], want["optimizer"]["state"], rtol=1e-5, atol=1e-6
            )
    ddp = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    for run in ("fsdp", "resumed"):
        weights = load_file(str(tmp_path / run / "model.safetensors"))
        torch.testing.assert_close(weights, ddp, rtol=1e-5, atol=1e-6)
    # 10 batches in groups of 3: 4 optimizer steps an epoch.
    assert read("ddp", "last.pt")["scheduler"]["last_epoch"] == 8
