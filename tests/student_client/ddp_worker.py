"""Run by test_ddp under torchrun: train from a config, record the ids each rank drew."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from lyceum.student_client.trainer import StepInfo, train

torch.set_num_threads(1)


def main(config: str, out_dir: str) -> None:
    seen: list[tuple[int, list[int]]] = []

    def record(step: StepInfo) -> None:
        seen.append((step.epoch, step.sample_ids.tolist()))

    result = train(config, on_step=record)
    rank = int(os.environ["RANK"])
    accuracy = result.val_accuracy
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"seen": seen, "accuracy": accuracy}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
