"""A teacher run inside the student's process: PaddleSlim's "naive" distillation.

    teacher = InProcessTeacher(load_model("lyceum.deploy.examples:teacher_cnn", "t.safetensors"),
                               train_set[0][0], outputs=["logits=@output", "layer3"])
    loader = DistillLoader(train_set, {"t": teacher}, batch_size=64)

The third knowledge source beside `OnlineTeacher` and `OfflineTeacher`, for a teacher small
enough to share the student's machine (or given a device of its own): no server, no dump.
It runs the teacher engine (`lyceum.teacher_server.engine`, the one servers and dumps run),
in inference mode, with the model in eval mode and without gradients, on the inputs of each
batch as the loader submits them (query mode: the student's own batch, in the loader's
producer thread, so the teacher's forward overlaps the student's step). Its replies go
through the same codec as a dump's shards, so the merger receives the knowledge, bit for
bit, that an offline dump of the same teacher would give it.

`outputs` are the engine's fields: `NAME=@output`, `NAME=@output.KEY`, `NAME=MODULE.PATH`,
or a bare module path without dots (`layer3`), a field named after it: the teacher side of a
feature pair named by module path (the student side is the loss term's `student:` key).

This module is the student client's one use of `lyceum.teacher_server`, imported when a
teacher is built (not with the package), so that one engine computes knowledge everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from lyceum.proto.codec import from_record_batch, to_record_batch
from lyceum.proto.items import item_inputs
from lyceum.proto.schema import KnowledgeSchema
from lyceum.proto.specs import Spec, load_model
from lyceum.student_client._answered import AnsweredAtOnce
from lyceum.student_client._module_paths import find_module

if TYPE_CHECKING:
    from lyceum.teacher_server.engine import OutputSpec

__all__ = ["DEFAULT_OUTPUTS", "InProcessTeacher", "Precision", "parse_outputs"]

DEFAULT_OUTPUTS = ("logits=@output",)
"""The model's output as the field `logits`, as `lyceum teacher dump` and `serve` default."""

Precision = Literal["fp32", "fp16", "bf16"]
"""dtype of float knowledge, as `lyceum teacher dump --precision`."""

_BARE_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_outputs(outputs: Sequence[str], where: str) -> tuple[OutputSpec, ...]:
    """The engine's output specs of `outputs` (see the module docstring); errors name `where`."""
    from lyceum.teacher_server.engine import OutputSpec

    specs = []
    for text in outputs:
        if "=" not in text and _BARE_PATH.match(text.strip()):
            specs.append(OutputSpec(name=text.strip(), source=text.strip()))
            continue
        if "=" not in text:
            raise ValueError(
                f"{where}: {text!r} needs a field name, e.g. feat={text} (field names are "
                f"letters, digits and underscores; a bare module path without dots names its "
                f"own field)"
            )
        try:
            specs.append(OutputSpec.parse(text))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    if not specs:
        raise ValueError(f"{where}: at least one output is needed, e.g. [logits=@output]")
    return tuple(specs)


class InProcessTeacher(AnsweredAtOnce):
    """A `KnowledgeSource` that runs `model` in this process (see the module docstring).

    `example_input` is one sample's input (`dataset[0][0]`), from which the engine learns the
    inputs' layout and the knowledge schema. `device`: where the teacher runs ("cpu",
    "cuda:1", ...), its own or the student's; its knowledge comes back on the CPU, as a dump's
    does, and the loader moves it to the student's device. `precision` is the dump's:
    fp32, fp16 or bf16 float knowledge.
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: Any,
        *,
        outputs: Sequence[str] = DEFAULT_OUTPUTS,
        device: str | torch.device = "cpu",
        precision: Precision = "fp32",
        name: str = "teacher",
    ) -> None:
        from lyceum.teacher_server.engine import EngineConfig, TeacherEngine

        self.name = name
        where = f"teacher {name!r} outputs"
        specs = parse_outputs(outputs, where)
        for spec in specs:
            if not spec.is_model_output:
                find_module(model, spec.source, f"{where} {spec.source!r}")
        model.requires_grad_(False)  # the student's optimizer never sees it; no graph either
        self.engine = TeacherEngine(
            model,
            EngineConfig(outputs=specs, device=str(device), precision=precision),
            example_input,
        )
        super().__init__()

    @classmethod
    def from_spec(
        cls,
        spec: Spec,
        checkpoint: str | Path | None,
        dataset: torch.utils.data.Dataset,
        *,
        outputs: Sequence[str] = DEFAULT_OUTPUTS,
        device: str | torch.device = "cpu",
        precision: Precision = "fp32",
        name: str = "teacher",
    ) -> InProcessTeacher:
        """The teacher a model spec and checkpoint name (`load_model`), with `dataset[0]`'s
        input as its example. The global RNG is left as it was: building the teacher (its
        factory's random init, before the checkpoint replaces it) must not change the
        student's adapters or anything else seeded after it."""
        with torch.random.fork_rng(devices=[]):
            model = load_model(spec, checkpoint)
        example = item_inputs(dataset[0])
        return cls(model, example, outputs=outputs, device=device, precision=precision, name=name)

    @property
    def schema(self) -> KnowledgeSchema:
        return self.engine.schema

    @property
    def needs_inputs(self) -> bool:
        return True

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def submit(self, request_id: int, ids: torch.Tensor, inputs: Any = None) -> None:
        if inputs is None:
            raise ValueError(
                f"in-process teacher {self.name!r} computes knowledge from the batch's "
                f"inputs: submit needs them"
            )
        columns = self.engine.infer(self._batch(inputs))
        # Through the codec, as a dump's shards are written and read: the same columns,
        # dtypes and jagged layout, and the same checks, as the offline knowledge.
        record = to_record_batch(self.schema, ids, columns)
        self._ready[request_id] = from_record_batch(
            record, self.schema, f"in-process teacher {self.name!r}"
        )

    def _batch(self, inputs: Any) -> Any:
        if isinstance(inputs, torch.Tensor):
            return inputs  # a stacked batch, as the engine's collate makes it
        if isinstance(inputs, Mapping):  # named tensors, collated: back to samples
            size = len(next(iter(inputs.values())))
            samples = [{k: v[i] for k, v in inputs.items()} for i in range(size)]
            return self.engine.collate_batch(samples)
        raise ValueError(
            f"in-process teacher {self.name!r}: inputs must be a batch tensor or a mapping of "
            f"named batch tensors, got {type(inputs).__name__}"
        )

    def close(self) -> None:
        self.engine.close()

    def __repr__(self) -> str:
        return f"InProcessTeacher({type(self.engine.model).__name__}, device={self.device})"
