"""Run by test_trainer_processes under torchrun: rank 1 alone is stopped (by a SIGTERM it
sends itself at step 3, or by its teacher failing after a few batches); every rank records
how its run ended, and how many DDP modules were alive when its process group was destroyed
(one kept alive keeps gloo running into interpreter exit, where it aborts the process)."""

from __future__ import annotations

import gc
import itertools
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lyceum.student_client.sources import OfflineTeacher, TeacherUnavailableError
from lyceum.student_client.trainer import StepInfo, train

torch.set_num_threads(1)


def _fail_after(requests: int) -> None:
    """This process's offline teachers refuse every request after the first `requests`."""
    submit = OfflineTeacher.submit
    count = itertools.count(1)

    def failing(self: OfflineTeacher, request_id: int, ids: Any, inputs: Any = None) -> None:
        if next(count) > requests:
            raise TeacherUnavailableError("rank 1's teacher is gone (test)")
        submit(self, request_id, ids, inputs)

    OfflineTeacher.submit = failing  # type: ignore[method-assign]


def _count_ddp_at_destroy(counted: list[int]) -> None:
    destroy = dist.destroy_process_group

    def counting(*args: Any, **kwargs: Any) -> None:
        counted.append(sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects()))
        destroy(*args, **kwargs)

    dist.destroy_process_group = counting


def main(config: str, out_dir: str, mode: str) -> None:
    rank = int(os.environ["RANK"])
    ddp_at_destroy: list[int] = []
    _count_ddp_at_destroy(ddp_at_destroy)
    if rank == 1 and mode == "teacher":
        _fail_after(8)

    def on_step(step: StepInfo) -> None:
        if rank == 1 and mode == "signal" and step.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    result = train(config, on_step=on_step)
    record = {
        "ended": result.ended,
        "signum": result.signum,
        "stopped_at": result.stopped_at,
        "error": result.error,
        "ddp_at_destroy": ddp_at_destroy,
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
