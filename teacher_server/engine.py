"""The teacher engine: batched inference that turns inputs into knowledge columns.

One engine owns one copy of the model on one device. Its knowledge fields are the model's
output (`@output`, or `@output.NAME` for models that return a dict or an object with
attributes, like Hugging Face outputs) and the outputs of named submodules, captured with
forward hooks. Values can be turned into log-probabilities at a temperature, cast to
fp16/bf16, and reduced to their top-k along the last dimension.

Sequence models: when each sample is a sequence of variable length (token ids `[T_i]`), the
engine right-pads a batch to the longest sequence, runs the model once, and cuts every
per-token output back to each sample's length. Padded positions must not change the real
ones, which holds for causal models (what LLM distillation uses). Which outputs are per-token
is found at start by probing with two sequence lengths.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from lyceum.proto.codec import DTYPE_NAMES
from lyceum.proto.schema import DType, FieldSpec, KnowledgeSchema, Meaning, TopK

Precision = Literal["fp32", "fp16", "bf16"]
_PRECISION_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
_OUTPUT_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(@output(\.[A-Za-z0-9_]+)?|[A-Za-z0-9_.]+)$")

INPUT_FIELD = "input"


class OutputSpec(BaseModel):
    """One knowledge field: `name=@output`, `name=@output.key` or `name=dotted.module.path`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    source: str = Field(description="'@output', '@output.KEY' or a submodule name.")

    @classmethod
    def parse(cls, text: str) -> OutputSpec:
        m = _OUTPUT_RE.match(text.strip())
        if not m:
            raise ValueError(
                f"--output {text!r}: expected NAME=@output, NAME=@output.KEY or NAME=MODULE "
                f"(e.g. logits=@output, feat=layer3)"
            )
        return cls(name=m.group(1), source=m.group(2))

    @property
    def is_model_output(self) -> bool:
        return self.source.startswith("@output")


class EngineConfig(BaseModel):
    """How the teacher turns a model into knowledge."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    outputs: tuple[OutputSpec, ...] = Field(
        default=(OutputSpec(name="logits", source="@output"),),
        description="Knowledge fields and where each comes from.",
    )
    device: str = Field(default="cpu", description="'cpu' or 'cuda:N'.")
    precision: Precision = Field(default="fp32", description="dtype of float knowledge values.")
    topk: int | None = Field(default=None, gt=0, description="Keep only the top-k of logit fields.")
    values: Literal["logits", "log_probs"] = Field(
        default="logits",
        description="Model-output fields as raw logits, or log-softmax(logits / temperature).",
    )
    temperature: float = Field(default=1.0, gt=0, description="Temperature for log_probs.")

    @field_validator("outputs")
    @classmethod
    def _check_outputs(cls, outputs: tuple[OutputSpec, ...]) -> tuple[OutputSpec, ...]:
        if not outputs:
            raise ValueError("at least one --output is needed (e.g. logits=@output)")
        names = [o.name for o in outputs]
        if len(set(names)) != len(names):
            raise ValueError(f"--output names must be unique, got {names}")
        return outputs

    @field_validator("device")
    @classmethod
    def _check_device(cls, device: str) -> str:
        if not re.match(r"^(cpu|cuda(:\d+)?|mps)$", device):
            raise ValueError(f"device {device!r}: expected 'cpu', 'cuda', 'cuda:N' or 'mps'")
        return device


def _select_output(out: Any, source: str) -> torch.Tensor:
    key = source.partition(".")[2]
    if key:
        value = out[key] if isinstance(out, dict) else getattr(out, key, None)
        if value is None:
            raise ValueError(f"output {source!r}: the model's output has no {key!r}")
        out = value
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise ValueError(
            f"output {source!r} is a {type(out).__name__}, not a tensor; use @output.KEY to pick one"
        )
    return out


class TeacherEngine:
    """Batched inference for one model on one device; `infer` returns codec-ready columns.

    Thread-safe: a lock serialises forward passes (hooks write per-call state), so one
    engine may be shared, but a server runs one engine per device for parallelism.
    """

    def __init__(
        self, model: nn.Module, config: EngineConfig, example_input: torch.Tensor | np.ndarray
    ) -> None:
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {config.device!r}: CUDA is not available on this machine")
        self.model = model.to(self.device).eval()
        self._lock = threading.Lock()
        self._captured: dict[str, torch.Tensor] = {}
        self._hooks = [self._add_hook(o) for o in config.outputs if not o.is_model_output]
        # Datasets may return numpy arrays: tensors from here on (no copy where possible).
        self.example_input = torch.as_tensor(example_input).detach().cpu()
        self.sequence_input = False
        self.input_schema = self._input_schema(self.example_input)
        self._per_token: set[str] = set()
        self.schema = self._probe()

    def _add_hook(self, spec: OutputSpec) -> torch.utils.hooks.RemovableHandle:
        modules = dict(self.model.named_modules())
        if spec.source not in modules:
            close = [n for n in modules if spec.source.split(".")[-1] in n][:5]
            raise ValueError(
                f"--output {spec.name}={spec.source}: the model has no submodule {spec.source!r}"
                + (f"; similar names: {close}" if close else "")
            )

        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            self._captured[spec.name] = _select_output(out, "@output")

        return modules[spec.source].register_forward_hook(hook)

    def _input_schema(self, example: torch.Tensor) -> KnowledgeSchema:
        dtype = DTYPE_NAMES.get(example.dtype)
        if dtype is None:
            raise ValueError(f"input dtype {example.dtype} is not supported by the knowledge codec")
        # Integer 1-d inputs are token sequences: their length varies from sample to sample.
        self.sequence_input = example.dim() >= 1 and not example.dtype.is_floating_point
        shape: tuple[int | None, ...] = tuple(example.shape)
        if self.sequence_input:
            shape = (None, *shape[1:])
        return KnowledgeSchema(fields=(FieldSpec(name=INPUT_FIELD, dtype=dtype, shape=shape),))

    def _raw_forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        self._captured = {}
        out = self.model(batch.to(self.device, non_blocking=True))
        result = {}
        for o in self.config.outputs:
            if o.is_model_output:
                result[o.name] = _select_output(out, o.source)
            elif o.name in self._captured:
                result[o.name] = self._captured[o.name]
            else:
                raise ValueError(
                    f"--output {o.name}={o.source}: submodule {o.source!r} did not run in the "
                    f"model's forward; pick a module on the forward path"
                )
        return result

    def _probe(self) -> KnowledgeSchema:
        with self._lock, torch.inference_mode():
            first = self._raw_forward(self.example_input.unsqueeze(0))
            if self.sequence_input:
                longer = torch.cat([self.example_input, self.example_input[-1:]]).unsqueeze(0)
                second = self._raw_forward(longer)
                length = self.example_input.shape[0]
                for name, t in first.items():
                    u = second[name]
                    if t.dim() >= 2 and t.shape[1] == length and u.shape[1] == length + 1:
                        self._per_token.add(name)
        fields = []
        for o in self.config.outputs:
            t = first[o.name]
            shape: tuple[int | None, ...] = tuple(t.shape[1:])
            if o.name in self._per_token:
                shape = (None, *shape[1:])
            fields.append(self._field_spec(o, t, shape))
        return KnowledgeSchema(fields=tuple(fields))

    def _field_spec(
        self, o: OutputSpec, t: torch.Tensor, shape: tuple[int | None, ...]
    ) -> FieldSpec:
        is_logits = o.is_model_output
        meaning: Meaning = "features"
        temperature = 1.0
        if is_logits:
            meaning = "log_probs" if self.config.values == "log_probs" else "logits"
            temperature = self.config.temperature if meaning == "log_probs" else 1.0
        found = DTYPE_NAMES.get(
            _PRECISION_DTYPES[self.config.precision] if t.dtype.is_floating_point else t.dtype
        )
        if found is None:
            raise ValueError(f"output {o.name!r}: dtype {t.dtype} is not supported")
        dtype: DType = found
        encoding: Any = {"kind": "dense"}
        if self.config.topk is not None and is_logits:
            if not shape or shape[-1] is None or self.config.topk > shape[-1]:
                raise ValueError(
                    f"--topk {self.config.topk}: output {o.name!r} has shape {list(shape)}; top-k "
                    f"needs a last dimension of at least k"
                )
            encoding = TopK(k=self.config.topk)
        return FieldSpec(
            name=o.name,
            dtype=dtype,
            shape=shape,
            encoding=encoding,
            meaning=meaning,
            temperature=temperature,
        )

    def collate(
        self, samples: Sequence[torch.Tensor | np.ndarray]
    ) -> tuple[torch.Tensor, list[int] | None]:
        """Stack samples into one batch; sequences are right-padded (lengths returned)."""
        tensors = [torch.as_tensor(s) for s in samples]
        if not self.sequence_input:
            return torch.stack(tensors), None
        lengths = [int(t.shape[0]) for t in tensors]
        if min(lengths, default=1) < 1:
            raise ValueError("sequence inputs must have at least one element")
        return nn.utils.rnn.pad_sequence(tensors, batch_first=True), lengths

    def infer(
        self, batch: torch.Tensor, lengths: Sequence[int] | None = None
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Knowledge columns (CPU tensors, keyed by codec column name) for one input batch."""
        with self._lock, torch.inference_mode():
            raw = self._raw_forward(batch)
            columns: dict[str, torch.Tensor | list[torch.Tensor]] = {}
            for spec in self.schema.fields:
                t = self._postprocess(spec, raw[spec.name])
                if isinstance(spec.encoding, TopK):
                    values, indices = torch.topk(t, spec.encoding.k, dim=-1)
                    parts = {spec.columns[0]: values, spec.columns[1]: indices.to(torch.int32)}
                else:
                    parts = {spec.name: t}
                for column, value in parts.items():
                    value = value.to("cpu", non_blocking=False)
                    if spec.variable:
                        if lengths is None:
                            raise ValueError(
                                f"field {spec.name!r} is per-token: lengths are needed"
                            )
                        columns[column] = [value[i, :n] for i, n in enumerate(lengths)]
                    else:
                        columns[column] = value
            return columns

    def _postprocess(self, spec: FieldSpec, t: torch.Tensor) -> torch.Tensor:
        if spec.meaning == "log_probs":
            t = torch.log_softmax(t.float() / spec.temperature, dim=-1)
        if t.dtype.is_floating_point:
            t = t.to(_PRECISION_DTYPES[self.config.precision])
        return t

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
