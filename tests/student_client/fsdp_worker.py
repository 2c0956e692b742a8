"""Run by test_ddp under torchrun: one config trained with DDP, then with FSDP, then with
FSDP resuming from the DDP run's first epoch (its `epoch-001.pt` as `last.pt`). This
process makes the process group, so the three runs share it (the trainer does not end a
group it did not make)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from lyceum.student_client.trainer import train

torch.set_num_threads(1)


def main(config: str, out_dir: str) -> None:
    raw = yaml.safe_load(Path(config).read_text())
    out = Path(out_dir)

    def run(name: str, parallel: str, **flags: Any) -> None:
        train({**raw, "parallel": parallel, "checkpoint_dir": str(out / name)}, **flags)

    dist.init_process_group("gloo")
    run("ddp", "ddp")
    run("fsdp", "fsdp")
    if int(os.environ["RANK"]) == 0:
        (out / "resumed").mkdir()
        shutil.copy(out / "ddp" / "epoch-001.pt", out / "resumed" / "last.pt")
    dist.barrier()
    run("resumed", "fsdp", resume=True)
    # As Distributed.close does: gloo torn down while rank 0 still writes its checkpoint was
    # seen to abort.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
