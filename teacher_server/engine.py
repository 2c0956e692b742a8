"""The teacher engine: batched inference that turns inputs into knowledge columns.

One engine owns one copy of the model on one device. Its knowledge fields are the model's
output (`@output`, or `@output.NAME` for models that return a dict or an object with
attributes, like Hugging Face outputs) and the outputs of named submodules, captured with
forward hooks. Values can be turned into log-probabilities at a temperature, cast to
fp16/bf16, and reduced to their top-k along the last dimension.

Sequence models: when each sample is a sequence of variable length (token ids `[T_i]`, or
named tensors such as `input_ids` + `attention_mask`, see `_inputs`), the engine right-pads
a batch to the longest sequence, runs the model once, and keeps every per-token output at
each sample's real positions only. Without an attention mask, padded positions must not
change the real ones, which holds for causal models (what LLM distillation uses). Which
outputs are per-token is found at start by probing with two sequence lengths. Per-token
log-probabilities, top-k and scored tokens (`score_ids` inputs: `log p_teacher(token)` for
on-policy distillation) are computed by chunks of positions (`_knowledge_step`), and the
knowledge schema names the vocabulary they index (`lyceum.proto.vocab`).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lyceum.proto.codec import DTYPE_NAMES
from lyceum.proto.items import packed_mask
from lyceum.proto.schema import DType, FieldSpec, KnowledgeSchema, Meaning, TopK
from lyceum.proto.vocab import Vocabulary, tokenizer_sha256
from lyceum.teacher_server._engine_config import PRECISION_DTYPES, EngineConfig, OutputSpec
from lyceum.teacher_server._inputs import (
    INPUT_FIELD,
    MASK_KEY,
    InputBatch,
    Sample,
    as_numpy_free,
    collate,
    learn_layout,
)
from lyceum.teacher_server._knowledge_step import (
    TokenStep,
    chunk_rows_for,
    real_rows,
    score_column,
    split_rows,
    token_columns,
)

__all__ = ["INPUT_FIELD", "EngineConfig", "OutputSpec", "TeacherEngine"]


def _select_output(out: Any, source: str) -> torch.Tensor:
    """The tensor `source` names in a model's output: `@output`, then one step per dotted
    part (a key or attribute; a number indexes a tuple)."""
    path = source.split(".")[1:]
    where = "@output"
    for part in path:
        if part.isdigit() and isinstance(out, tuple | list):
            if int(part) >= len(out):
                raise ValueError(
                    f"output {source!r}: {where} has {len(out)} entries (0..{len(out) - 1})"
                )
            out = out[int(part)]
        else:
            value = (
                out[part] if isinstance(out, Mapping) and part in out else getattr(out, part, None)
            )
            if value is None:
                raise ValueError(
                    f"output {source!r}: {where} has no {part!r} (or it is None: Hugging Face "
                    f"models return hidden states and attentions only when their config sets "
                    f"output_hidden_states / output_attentions)"
                )
            out = value
        where = f"{where}.{part}"
    if isinstance(out, tuple | list) and path:
        raise ValueError(
            f"output {source!r} is a tuple of {len(out)} entries: pick one with "
            f"{source}.N (N in 0..{len(out) - 1}; for hidden states, 0 is the embeddings)"
        )
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        # A bare @output of a model returning (main, extras...): its first entry.
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

    def __init__(self, model: nn.Module, config: EngineConfig, example_input: Any) -> None:
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {config.device!r}: CUDA is not available on this machine")
        self.model = model.to(self.device).eval()
        self._lock = threading.Lock()
        self._captured: dict[str, torch.Tensor] = {}
        self._hooks = [self._add_hook(o) for o in config.outputs if not o.is_model_output]
        # Datasets may return numpy arrays: tensors from here on (no copy where possible).
        example = as_numpy_free(example_input)
        self.example_input = (
            {k: v.detach().cpu() for k, v in example.items()}
            if isinstance(example, Mapping)
            else example.detach().cpu()
        )
        self.layout, self.input_schema = learn_layout(self.model, self.example_input)
        self.sequence_input = self.layout.variable
        self._mask_dtype = next(
            (p.dtype for p in self.model.parameters() if p.dtype.is_floating_point),
            torch.float32,
        )
        self._per_token: set[str] = set()
        self._steps: dict[str, TokenStep] = {}
        self.schema = self._probe()

    @property
    def example_bytes(self) -> int:
        """Bytes of the example input (every named tensor of a dict input)."""
        ex = self.example_input
        tensors = list(ex.values()) if isinstance(ex, Mapping) else [ex]
        return sum(t.numel() * t.element_size() for t in tensors)

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

    def _model_inputs(self, batch: InputBatch) -> torch.Tensor | dict[str, torch.Tensor]:
        x = batch.model_inputs
        if isinstance(x, torch.Tensor):
            return x.to(self.device, non_blocking=True)
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in x.items()}
        if batch.positions is not None and self.layout.takes_mask:
            # Packed documents: a mask that keeps each token inside its own document.
            inputs[MASK_KEY] = packed_mask(
                inputs["position_ids"], inputs.get(MASK_KEY), self._mask_dtype
            )
        return inputs

    def _raw_forward(self, batch: InputBatch) -> dict[str, torch.Tensor]:
        self._captured = {}
        inputs = self._model_inputs(batch)
        out = self.model(**inputs) if isinstance(inputs, dict) else self.model(inputs)
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

    def _longer_example(self) -> Sample:
        """The example with its last position repeated: per-token outputs grow by one."""
        ex = self.example_input
        if isinstance(ex, Mapping):
            return {
                k: torch.cat([v, v[-1:]]) if k in self.layout.per_token else v
                for k, v in ex.items()
            }
        return torch.cat([ex, ex[-1:]])

    def _probe(self) -> KnowledgeSchema:
        with self._lock, torch.inference_mode():
            example = collate([self.example_input], self.layout)
            first = self._raw_forward(example)
            if self.sequence_input:
                second = self._raw_forward(collate([self._longer_example()], self.layout))
                length = example.padded_tokens
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
        fields.extend(self._score_field(fields))
        for spec in fields:
            if spec.name in self._per_token:
                self._steps[spec.name] = TokenStep(
                    spec=spec,
                    out_dtype=PRECISION_DTYPES[self.config.precision]
                    if spec.dtype in ("float32", "float16", "bfloat16")
                    else first[spec.name].dtype,
                    log_probs=spec.meaning == "log_probs",
                )
        return KnowledgeSchema(fields=tuple(fields), vocab=self._vocabulary(fields))

    def _logits_field(self, fields: Sequence[FieldSpec]) -> FieldSpec | None:
        """The first per-token model-output field: the logits a vocabulary indexes."""
        model_outputs = {o.name for o in self.config.outputs if o.is_logits}
        return next(
            (f for f in fields if f.name in model_outputs and f.name in self._per_token), None
        )

    def _score_field(self, fields: Sequence[FieldSpec]) -> list[FieldSpec]:
        name = self.config.score
        if name is None:
            return []
        logits = self._logits_field(fields)
        score = self.input_schema.fields if self.layout.kind == "dict" else ()
        if logits is None or not any(f.name == "score_ids" for f in score):
            raise ValueError(
                f"--score {name}: scoring needs token-level logits (a per-token model output) "
                f"and inputs that carry 'score_ids' per position (dict items with input_ids "
                f"and score_ids); this teacher has "
                f"{'no per-token model output' if logits is None else 'no score_ids input'}"
            )
        ids_shape = self.input_schema.field("score_ids").shape
        temperature = self.config.temperature if self.config.values == "log_probs" else 1.0
        self._per_token.add(name)
        return [
            FieldSpec(
                name=name,
                dtype="float32",
                shape=(None, *ids_shape[1:]),
                meaning="log_probs",
                temperature=temperature,
            )
        ]

    def _vocabulary(self, fields: Sequence[FieldSpec]) -> Vocabulary | None:
        logits = self._logits_field(fields)
        if logits is None or logits.shape[-1] is None:
            if self.config.tokenizer is not None:
                raise ValueError(
                    "--tokenizer names a vocabulary, but the teacher has no token-level logits "
                    "(a per-token model output) for it to index"
                )
            return None
        sha = tokenizer_sha256(self.config.tokenizer) if self.config.tokenizer else None
        return Vocabulary(size=logits.shape[-1], tokenizer_sha256=sha)

    def _field_spec(
        self, o: OutputSpec, t: torch.Tensor, shape: tuple[int | None, ...]
    ) -> FieldSpec:
        is_logits = o.is_logits
        meaning: Meaning = "features"
        temperature = 1.0
        if is_logits:
            meaning = "log_probs" if self.config.values == "log_probs" else "logits"
            temperature = self.config.temperature if meaning == "log_probs" else 1.0
        found = DTYPE_NAMES.get(
            PRECISION_DTYPES[self.config.precision] if t.dtype.is_floating_point else t.dtype
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
            encoding = TopK(
                k=self.config.topk,
                index_code=self.config.topk_indices,
                value_bits=8 if self.config.topk_values == "uint8" else None,
            )
        return FieldSpec(
            name=o.name,
            dtype=dtype,
            shape=shape,
            encoding=encoding,
            meaning=meaning,
            temperature=temperature,
        )

    def collate_batch(self, samples: Sequence[Any]) -> InputBatch:
        """One batch of samples of any layout (see `_inputs`)."""
        return collate([as_numpy_free(s) for s in samples], self.layout)

    def infer(
        self, batch: torch.Tensor | InputBatch, lengths: Sequence[int] | None = None
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Knowledge columns (CPU tensors, keyed by codec column name) for one input batch:
        an `InputBatch`, or a stacked / right-padded tensor with its sequences' `lengths`."""
        if isinstance(batch, torch.Tensor):
            spans = [(0, int(n)) for n in lengths] if lengths is not None else None
            batch = InputBatch(batch, spans)
        with self._lock, torch.inference_mode():
            raw = self._raw_forward(batch)
            columns: dict[str, torch.Tensor | list[torch.Tensor]] = {}
            rows: torch.Tensor | None = None
            for spec in self.schema.fields:
                if spec.name not in self._per_token:
                    columns.update(self._dense_columns(spec, raw[spec.name]))
                    continue
                if batch.spans is None:
                    raise ValueError(f"field {spec.name!r} is per-token: lengths are needed")
                source = raw.get(spec.name)
                width = (
                    int(next(iter(raw.values())).shape[1]) if source is None else source.shape[1]
                )
                if rows is None:
                    rows = real_rows(batch.spans, width, self.device)
                lengths_ = [b - a for a, b in batch.spans]
                for column, flat in self._token_columns(spec, raw, rows, batch).items():
                    columns[column] = split_rows(flat, lengths_)
            return columns

    def _token_columns(
        self, spec: FieldSpec, raw: dict[str, torch.Tensor], rows: torch.Tensor, batch: InputBatch
    ) -> dict[str, torch.Tensor]:
        if spec.name == self.config.score:
            logits_spec = self._logits_field(self.schema.fields)
            if batch.score_ids is None or logits_spec is None:
                raise ValueError(f"field {spec.name!r} scores tokens: the inputs need score_ids")
            output = raw[logits_spec.name]
            flat = score_column(
                output,
                rows,
                batch.score_ids,
                chunk_rows_for(output.shape[-1], self.config.chunk_mib << 20),
                spec.temperature,
            )
            return {spec.name: flat if len(spec.shape) > 1 else flat.squeeze(-1)}
        output = raw[spec.name]
        vocab = output.shape[-1] if output.dim() > 2 else 1
        return token_columns(
            self._steps[spec.name],
            output,
            rows,
            chunk_rows_for(vocab, self.config.chunk_mib << 20),
            spec.temperature,
        )

    def _dense_columns(self, spec: FieldSpec, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        t = self._postprocess(spec, raw)
        if isinstance(spec.encoding, TopK):
            values, indices = torch.topk(t, spec.encoding.k, dim=-1)
            parts = {spec.columns[0]: values, spec.columns[1]: indices.to(torch.int32)}
        else:
            parts = {spec.name: t}
        return {column: value.to("cpu", non_blocking=False) for column, value in parts.items()}

    def _postprocess(self, spec: FieldSpec, t: torch.Tensor) -> torch.Tensor:
        if spec.meaning == "log_probs":
            t = torch.log_softmax(t.float() / spec.temperature, dim=-1)
        if t.dtype.is_floating_point:
            t = t.to(PRECISION_DTYPES[self.config.precision])
        return t

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
