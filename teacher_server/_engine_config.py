"""What a teacher engine computes: its knowledge fields (`OutputSpec`) and `EngineConfig`.

Import these from `lyceum.teacher_server.engine`; they live here so the engine module holds
the inference itself.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lyceum.proto.schema import FieldSpec

Precision = Literal["fp32", "fp16", "bf16"]
PRECISION_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
_OUTPUT_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(@output(\.[A-Za-z0-9_]+)*|[A-Za-z0-9_.]+)$")

# Entries of a Hugging Face output that are features, never logits.
_FEATURE_KEYS = frozenset({"hidden_states", "attentions", "last_hidden_state", "past_key_values"})

__all__ = ["PRECISION_DTYPES", "EngineConfig", "OutputSpec", "Precision"]


class OutputSpec(BaseModel):
    """One knowledge field: `name=@output`, `name=@output.KEY`, `name=@output.KEY.N` (entry N
    of a tuple, e.g. the hidden states of layer N) or `name=dotted.module.path`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    source: str = Field(description="'@output', '@output.KEY' or a submodule name.")

    @classmethod
    def parse(cls, text: str) -> OutputSpec:
        m = _OUTPUT_RE.match(text.strip())
        if not m:
            raise ValueError(
                f"--output {text!r}: expected NAME=@output, NAME=@output.KEY, "
                f"NAME=@output.KEY.N or NAME=MODULE (e.g. logits=@output, "
                f"h2=@output.hidden_states.2, feat=layer3)"
            )
        return cls(name=m.group(1), source=m.group(2))

    @property
    def is_model_output(self) -> bool:
        return self.source.startswith("@output")

    @property
    def is_logits(self) -> bool:
        """A model output other than hidden states or attentions: what --values, --topk and
        --score apply to."""
        parts = self.source.split(".")
        return self.is_model_output and (len(parts) < 2 or parts[1] not in _FEATURE_KEYS)


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
    topk_values: Literal["float", "uint8"] = Field(
        default="float",
        description="How top-k values are stored: 'float', in the precision's dtype; "
        "'uint8', one byte each with a float16 offset and scale per position (error at most "
        "about (max - min) / 508 of the position's k values), decoded to floats on reading.",
    )
    topk_indices: Literal["fixed", "elias_fano"] = Field(
        default="fixed",
        description="How top-k indices are stored, losslessly: 'fixed', each in the fewest "
        "bits the vocabulary allows, largest value first; 'elias_fano', each position's "
        "indices sorted ascending and Elias-Fano coded (e.g. 80 bytes for k=128 of 1,024 "
        "ids instead of 256), the values in the same order.",
    )
    values: Literal["logits", "log_probs"] = Field(
        default="logits",
        description="Model-output fields as raw logits, or log-softmax(logits / temperature).",
    )
    temperature: float = Field(
        default=1.0,
        gt=0,
        description="Temperature of log_probs (log-softmax(logits / T)); raw logits have none.",
    )
    score: str | None = Field(
        default=None,
        description="Name of a knowledge field holding log p_teacher(token) of the `score_ids` "
        "each sample carries per position (log-softmax of the first model-output field at "
        "the temperature of log_probs, else 1); None: no scoring.",
    )
    tokenizer: Path | None = Field(
        default=None,
        description="The teacher's tokenizer.json (or a directory holding one): its "
        "vocabulary's sha256 goes into the knowledge schema, so students of another "
        "tokenizer are refused.",
    )
    chunk_mib: int = Field(
        default=64,
        gt=0,
        description="Float32 memory of one chunk of positions in the per-token knowledge step "
        "(log-softmax, top-k, scoring): bounds the step's extra memory at any batch size.",
    )

    @field_validator("outputs")
    @classmethod
    def _check_outputs(cls, outputs: tuple[OutputSpec, ...]) -> tuple[OutputSpec, ...]:
        if not outputs:
            raise ValueError("at least one --output is needed (e.g. logits=@output)")
        names = [o.name for o in outputs]
        if len(set(names)) != len(names):
            raise ValueError(f"--output names must be unique, got {names}")
        return outputs

    @model_validator(mode="after")
    def _check_temperature(self) -> EngineConfig:
        # Raw logits carry no temperature: one given with them was dropped without a word,
        # and the knowledge said T=1.
        if self.values == "logits" and self.temperature != 1.0:
            raise ValueError(
                f"--temperature {self.temperature:g} applies only to log-probabilities: add "
                f"--values log_probs to serve log-softmax(logits / {self.temperature:g}), or "
                f"drop --temperature to serve raw logits (a student's loss applies its own "
                f"temperature to logits)"
            )
        return self

    @model_validator(mode="after")
    def _check_topk_storage(self) -> EngineConfig:
        # Without --topk there are no top-k values or indices: the option would do nothing.
        if self.topk is None and (self.topk_values != "float" or self.topk_indices != "fixed"):
            raise ValueError(
                f"--topk-values {self.topk_values} / --topk-indices {self.topk_indices} apply "
                f"to top-k fields only: add --topk K, or drop them"
            )
        return self

    @model_validator(mode="after")
    def _check_score(self) -> EngineConfig:
        if self.score is None:
            return self
        if self.score in {o.name for o in self.outputs}:
            raise ValueError(f"--score {self.score!r} is already an --output name; pick another")
        if not any(o.is_logits for o in self.outputs):
            raise ValueError(
                "--score needs a model-output field to score with (e.g. --output logits=@output)"
            )
        FieldSpec(name=self.score, dtype="float32", shape=(None,))  # the name's own check
        return self

    @field_validator("device")
    @classmethod
    def _check_device(cls, device: str) -> str:
        if not re.match(r"^(cpu|cuda(:\d+)?|mps)$", device):
            raise ValueError(f"device {device!r}: expected 'cpu', 'cuda', 'cuda:N' or 'mps'")
        return device
