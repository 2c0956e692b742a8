"""The teacher's inputs: what one sample is, the input schema, and collating a batch.

A sample is one of:

- a tensor of fixed shape (images, features): batches are stacked;
- a token sequence, an integer tensor `[T_i]`: batches are right-padded to the longest;
- named tensors (`{"input_ids", "attention_mask", "position_ids", ...}`), each passed to the
  model's forward by name. Per-token entries (integer or bool, leading dim the sample's
  length) are right-padded to the batch's longest; `score_ids` (`SCORE_KEY`) are token ids
  to score per position, consumed by the engine.

Padding inside a sample is the sample's own: an `attention_mask` with zeros marks it (left
padding from `generate`, or right padding). Knowledge covers a sample's real positions only
(mask 1, which must be one contiguous run), one row per real token in order. Position ids
follow the mask (`cumsum(mask) - 1`) when the model takes them and the sample gives none, so
left padding changes no real position. A sample that gives `position_ids` is packed: each
restart at 0 begins a document, and the engine builds a 4-d mask that lets each token attend
to earlier tokens of its own document only (`proto.items.packed_mask`), for models that accept one (HF).

Everything here is picklable and model-free: a dump's loader workers collate with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lyceum.proto.codec import DTYPE_NAMES
from lyceum.proto.items import SCORE_KEY
from lyceum.proto.schema import FieldSpec, KnowledgeSchema

INPUT_FIELD = "input"
MASK_KEY = "attention_mask"
POSITION_KEY = "position_ids"

_USUAL_KEYS = frozenset({MASK_KEY, POSITION_KEY, "input_ids", "token_type_ids"})

Sample = torch.Tensor | Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class InputLayout:
    """What a sample is (see the module docstring), learnt from an example at start."""

    kind: str  # "tensor", "sequence" or "dict"
    keys: tuple[str, ...] = ()
    per_token: frozenset[str] = frozenset()
    takes_mask: bool = False
    takes_positions: bool = False

    @property
    def variable(self) -> bool:
        """True if samples are sequences of varying length."""
        return self.kind == "sequence" or bool(self.per_token)


@dataclass
class InputBatch:
    """A collated batch: the model's inputs, and where each sample's real positions are.

    `spans[i]` is `(start, stop)` of sample i's real positions in the padded batch (None for
    fixed-shape inputs); `score_ids` `[B, T, S]` the token ids to score (or None)."""

    model_inputs: torch.Tensor | dict[str, torch.Tensor]
    spans: list[tuple[int, int]] | None
    score_ids: torch.Tensor | None = None
    positions: torch.Tensor | None = None

    def pin_memory(self) -> InputBatch:
        """A copy in pinned memory (DataLoader's `pin_memory=True` calls this)."""
        x = self.model_inputs
        pinned = (
            x.pin_memory()
            if isinstance(x, torch.Tensor)
            else {k: v.pin_memory() for k, v in x.items()}
        )
        score = self.score_ids.pin_memory() if self.score_ids is not None else None
        return InputBatch(pinned, self.spans, score, self.positions)

    @property
    def samples(self) -> int:
        inputs = self.model_inputs
        first = inputs if isinstance(inputs, torch.Tensor) else next(iter(inputs.values()))
        return int(first.shape[0])

    @property
    def padded_tokens(self) -> int:
        """Positions the model computes (padding included); 0 for fixed-shape inputs."""
        if self.spans is None:
            return 0
        inputs = self.model_inputs
        first = inputs if isinstance(inputs, torch.Tensor) else next(iter(inputs.values()))
        return int(first.shape[0] * first.shape[1])

    @property
    def real_tokens(self) -> int:
        return sum(b - a for a, b in self.spans) if self.spans is not None else 0


def _forward_params(model: nn.Module) -> tuple[set[str], bool]:
    import inspect

    params = inspect.signature(model.forward).parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return set(params), var_kw


def sample_length(sample: Sample) -> int:
    """A sequence sample's length (its padded length for named tensors), 0 for others."""
    if isinstance(sample, Mapping):
        for value in sample.values():
            t = torch.as_tensor(value)
            if t.dim() >= 1 and not t.dtype.is_floating_point:
                return int(t.shape[0])
        return 0
    t = torch.as_tensor(sample)
    return int(t.shape[0]) if t.dim() >= 1 and not t.dtype.is_floating_point else 0


def real_length(sample: Sample) -> int:
    """A sequence sample's real positions, the rows of its knowledge: its attention mask's
    ones if it has one, else `sample_length`."""
    if isinstance(sample, Mapping) and MASK_KEY in sample:
        return int(torch.as_tensor(sample[MASK_KEY]).sum())
    return sample_length(sample)


def learn_layout(model: nn.Module, example: Sample) -> tuple[InputLayout, KnowledgeSchema]:
    """The layout and input schema of samples like `example` for `model`."""
    if not isinstance(example, Mapping):
        t = torch.as_tensor(example)
        sequence = t.dim() >= 1 and not t.dtype.is_floating_point
        kind = "sequence" if sequence else "tensor"
        shape: tuple[int | None, ...] = (None, *t.shape[1:]) if sequence else tuple(t.shape)
        field = FieldSpec(name=INPUT_FIELD, dtype=_dtype(t, INPUT_FIELD), shape=shape)
        return InputLayout(kind=kind), KnowledgeSchema(fields=(field,))
    params, var_kw = _forward_params(model)
    if var_kw:
        # A forward(**kwargs) (Hugging Face's) may drop a key it does not know without a
        # word: beyond its named parameters only the usual masks and ids pass.
        params |= _USUAL_KEYS
    keys = tuple(str(k) for k in example)
    unknown = [k for k in keys if k != SCORE_KEY and k not in params]
    if unknown:
        raise ValueError(
            f"dataset items name inputs {unknown} that the model's forward does not take "
            f"(its parameters: {sorted(params)}); drop them from the items, or name them "
            f"as the forward does"
        )
    length = sample_length(example)
    per_token: set[str] = set()
    fields = []
    for key in keys:
        t = torch.as_tensor(example[key])
        token_level = t.dim() >= 1 and not t.dtype.is_floating_point and t.shape[0] == length
        if token_level:
            per_token.add(key)
        shape = (None, *t.shape[1:]) if token_level else tuple(t.shape)
        fields.append(FieldSpec(name=key, dtype=_dtype(t, key), shape=shape))
    if SCORE_KEY in keys and SCORE_KEY not in per_token:
        raise ValueError(
            f"input {SCORE_KEY!r} must hold integer token ids per position ([T] or [T, S]), "
            f"got {torch.as_tensor(example[SCORE_KEY]).dtype} {list(example[SCORE_KEY].shape)}"
        )
    layout = InputLayout(
        kind="dict",
        keys=keys,
        per_token=frozenset(per_token),
        takes_mask=MASK_KEY in params,
        takes_positions=POSITION_KEY in params,
    )
    return layout, KnowledgeSchema(fields=tuple(fields))


def _dtype(t: torch.Tensor, name: str) -> Any:
    dtype = DTYPE_NAMES.get(t.dtype)
    if dtype is None:
        raise ValueError(f"input {name!r}: dtype {t.dtype} is not supported by the knowledge codec")
    return dtype


def _span(mask: torch.Tensor, sample: int) -> tuple[int, int]:
    real = torch.nonzero(mask).flatten()
    if real.numel() == 0:
        raise ValueError(f"sample {sample}: its attention_mask has no real position (all 0)")
    start, stop = int(real[0]), int(real[-1]) + 1
    if stop - start != real.numel():
        raise ValueError(
            f"sample {sample}: its attention_mask has zeros between real positions; padding "
            f"must be at the start or the end of a sample (pack documents with position_ids)"
        )
    return start, stop


def collate(samples: Sequence[Sample], layout: InputLayout) -> InputBatch:
    """One batch of `samples` (see the module docstring)."""
    if layout.kind == "tensor":
        return InputBatch(torch.stack([torch.as_tensor(s) for s in samples]), None)
    if layout.kind == "sequence":
        tensors = [torch.as_tensor(s) for s in samples]
        lengths = [int(t.shape[0]) for t in tensors]
        if min(lengths, default=1) < 1:
            raise ValueError("sequence inputs must have at least one element")
        padded = nn.utils.rnn.pad_sequence(tensors, batch_first=True)
        return InputBatch(padded, [(0, n) for n in lengths])
    return _collate_named(samples, layout)


def _collate_named(samples: Sequence[Sample], layout: InputLayout) -> InputBatch:
    named = [s for s in samples if isinstance(s, Mapping)]
    if len(named) != len(samples):
        raise ValueError("this teacher's inputs are named tensors: every sample must be a dict")
    for i, s in enumerate(named):
        if set(s) != set(layout.keys):
            raise ValueError(
                f"sample {i} has inputs {sorted(s)}; this teacher takes {sorted(layout.keys)} "
                f"(its input schema, learnt from the dataset's first item or the example)"
            )
    lengths = [sample_length(s) for s in named]
    if min(lengths, default=1) < 1:
        raise ValueError("sequence inputs must have at least one position")
    inputs: dict[str, torch.Tensor] = {}
    for key in layout.keys:
        tensors = [torch.as_tensor(s[key]) for s in named]
        if key in layout.per_token:
            for i, (t, n) in enumerate(zip(tensors, lengths, strict=True)):
                if t.shape[0] != n:
                    raise ValueError(
                        f"sample {i}: input {key!r} has {t.shape[0]} positions, its other "
                        f"inputs {n}; per-token inputs must have the same length"
                    )
            inputs[key] = nn.utils.rnn.pad_sequence(tensors, batch_first=True)
        else:
            inputs[key] = torch.stack(tensors)
    score = inputs.pop(SCORE_KEY, None)
    if score is not None and score.dim() == 2:
        score = score.unsqueeze(-1)
    mask = inputs.get(MASK_KEY)
    if mask is not None:
        spans = [_span(mask[i, :n], i) for i, n in enumerate(lengths)]
    else:
        spans = [(0, n) for n in lengths]
        if layout.takes_mask and len(set(lengths)) > 1:
            # Right padding added here: the model must not attend to it (non-causal models).
            width = max(lengths)
            inputs[MASK_KEY] = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    positions = inputs.get(POSITION_KEY)
    if positions is None and mask is not None and layout.takes_positions:
        inputs[POSITION_KEY] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return InputBatch(inputs, spans, score, positions)


def as_numpy_free(sample: Any) -> Sample:
    """A dataset's input as tensors (datasets may return numpy arrays; no copy)."""
    if isinstance(sample, Mapping):
        return {str(k): torch.as_tensor(v) for k, v in sample.items()}
    if isinstance(sample, np.ndarray):
        return torch.from_numpy(sample)
    return torch.as_tensor(sample)
