"""The demo's compression rows: PaddleSlim's hybrid table, from two `lyceum compress`
pipelines shipped in `deploy/configs/`.

`demo_distill_quant.yaml` starts from the student trained from scratch (the table's
baseline), distils it from the teacher's dump and quantizes it to int8 with QAT, distilled;
`demo_prune_quant.yaml` starts from that distilled student, prunes it to -50% FLOPs with a
distilled fine-tune and quantizes it the same way. The demo fills in each config's paths
(the starting checkpoint, the dump, the run directory) and its `labeled` and `seed`, and
reads five rows of the two reports by stage name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lyceum.proto.configs import read_yaml_mapping
from lyceum.proto.display import format_bytes

if TYPE_CHECKING:  # the pipeline loads torchao and Torch-Pruning: only the demo's run needs them
    from lyceum.compression.pipeline import PipelineConfig, StageRow

__all__ = ["DISTILL_QUANT", "PRUNE_QUANT", "HybridRow", "demo_pipeline", "hybrid_rows"]

CONFIGS = Path(__file__).resolve().parent / "configs"
DISTILL_QUANT = CONFIGS / "demo_distill_quant.yaml"
PRUNE_QUANT = CONFIGS / "demo_prune_quant.yaml"
_DUMP_TEACHER = "dumped"  # the teacher entry of both configs that reads the demo's dump


@dataclass(frozen=True)
class HybridRow:
    """One row of the hybrid table: a stage's row of a pipeline report."""

    name: str
    accuracy: float
    size_bytes: int  # on disk: safetensors for float models, the torch.export archive for int8
    tensor_bytes: int  # what the model's tensors take: the figure int8 makes 4x smaller
    flops: int
    source: str  # `run/stage`: where the row comes from

    def line(self) -> str:
        size = f"{format_bytes(self.size_bytes)} ({format_bytes(self.tensor_bytes)} tensors)"
        return (
            f"{self.name:<34} {self.accuracy * 100:>8.1f}%  {size:<28} {self.flops:>6,}  "
            f"{self.source}"
        )


def demo_pipeline(
    path: Path,
    *,
    out_dir: Path,
    checkpoint: Path,
    knowledge_dir: Path,
    labeled: int,
    seed: int,
) -> PipelineConfig:
    """A demo pipeline config with the demo's paths filled in: `checkpoint` (the model it
    starts from), `out_dir`, and the dump of every stage's `dumped` teacher."""
    from lyceum.compression.pipeline import validate_pipeline

    raw: dict[str, Any] = read_yaml_mapping(path, "pipeline")
    stages = []
    for stage in raw.get("stages", []):
        teachers = dict(stage.get("teachers", {}))
        if _DUMP_TEACHER in teachers:
            teachers[_DUMP_TEACHER] = {**teachers[_DUMP_TEACHER], "dir": str(knowledge_dir)}
            stage = {**stage, "teachers": teachers}
        stages.append(stage)
    raw.update(
        checkpoint=str(checkpoint),
        out_dir=str(out_dir),
        labeled=labeled,
        seed=seed,
        stages=stages,
    )
    return validate_pipeline(raw, str(path))


def hybrid_rows(
    workdir: Path,
    *,
    scratch: Path,
    knowledge_dir: Path,
    labeled: int,
    seed: int,
    log: Callable[[str], None],
) -> list[HybridRow]:
    """Run both pipelines in `workdir` (from the scratch student's weights `scratch`) and
    return the five rows: baseline, distilled, distilled + int8, pruned, pruned + int8."""
    from lyceum.compression.pipeline import compress

    common: dict[str, Any] = {"knowledge_dir": knowledge_dir, "labeled": labeled, "seed": seed}
    log(f"[5/6] lyceum compress {DISTILL_QUANT.name}: distil the scratch student, QAT int8")
    first = compress(
        demo_pipeline(
            DISTILL_QUANT, out_dir=workdir / "distill_quant", checkpoint=scratch, **common
        )
    )
    distilled = first.out_dir / "stages" / "distil" / "model.safetensors"
    log(f"[6/6] lyceum compress {PRUNE_QUANT.name}: prune the distilled student, QAT int8")
    second = compress(
        demo_pipeline(PRUNE_QUANT, out_dir=workdir / "prune_quant", checkpoint=distilled, **common)
    )
    a = {r.stage: r for r in first.rows}
    b = {r.stage: r for r in second.rows}
    return [
        _row("baseline (scratch)", a["baseline"], "distill_quant", scratch),
        _row("distilled", a["distil"], "distill_quant", first.out_dir),
        _row("distilled + int8 (QAT)", a["int8"], "distill_quant", first.out_dir),
        _row("pruned -50% FLOPs", b["pruned"], "prune_quant", second.out_dir),
        _row("pruned -50% FLOPs + int8 (QAT)", b["int8"], "prune_quant", second.out_dir),
    ]


def _row(name: str, row: StageRow, run: str, where: Path) -> HybridRow:
    if row.size_bytes is None or row.flops is None:
        raise ValueError(
            f"{run} stage {row.stage!r} wrote no model file: the demo reads its size and "
            f"MACs; end the stage outside the quantization window in {run}'s config"
        )
    file = where / row.file if row.file is not None else where
    return HybridRow(
        name=name,
        accuracy=row.accuracy,
        size_bytes=row.size_bytes,
        tensor_bytes=_tensor_bytes(file),
        flops=row.flops,
        source=f"{run}/{row.stage}",
    )


def _tensor_bytes(file: Path) -> int:
    if file.suffix == ".pt2":
        from lyceum.compression.quantization.export import load_int8
        from lyceum.compression.quantization.workflow import tensor_bytes

        return tensor_bytes(load_int8(file))
    from safetensors.torch import load_file

    return sum(t.numel() * t.element_size() for t in load_file(str(file)).values())
