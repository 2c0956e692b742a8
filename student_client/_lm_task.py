"""The causal language-model task of the trainer (`task: causal_lm`): one step's loss and an
epoch's validation figures, on batches of `_lm_collate.LMCollate`.

A step runs the student on the batch's rows (a 2-d attention mask for padded rows, the
per-document `proto.items.packed_mask` for packed ones, position ids when its forward takes
them), keeps the logits of the real positions only, in the items' order, and compares them
position by position:

- with the targets: shifted cross-entropy (`IGNORE_INDEX` ignored), averaged over the
  positions that have a target and count (`loss_mask`);
- with the teachers' token-level knowledge, flattened the same way; each item's knowledge
  must have as many positions as the item has real tokens (checked, naming the sample id),
  and every distillation term gets the loss mask, so a masked position contributes nothing
  to any term. A student vocabulary padded beyond the teacher's is cut to it
  (`proto.vocab.align_logits`).

Validation: held-out perplexity (exp of the mean cross-entropy over counted targets) and,
given an offline dump of the validation set, the forward KL of the teacher to the student at
T = 1 over the counted positions (top-k: the leftover mass as one bucket when the teacher
sent log-probs, else renormalised).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lyceum.proto.items import packed_mask
from lyceum.proto.schema import SAMPLE_ID, KnowledgeSchema, TopK
from lyceum.proto.vocab import Vocabulary, align_logits
from lyceum.student_client._lm_collate import IGNORE_INDEX, LMCollate
from lyceum.student_client._lm_config import LMConfig
from lyceum.student_client._objective import DistillObjective
from lyceum.student_client._positions import jagged_offsets
from lyceum.student_client.losses import SoftLabelKD, TopKKD
from lyceum.student_client.offline import OfflineKnowledge
from lyceum.student_client.sources import KnowledgeSource
from lyceum.student_client.trainer_config import TrainConfig

__all__ = ["CausalLMTask", "LMValidation", "masked_objective", "model_vocabulary"]


@dataclass(frozen=True)
class LMValidation:
    """An epoch's held-out figures; `kl` None without a validation teacher."""

    perplexity: float
    kl: float | None
    tokens: int


def model_vocabulary(model: nn.Module) -> Vocabulary | None:
    """The vocabulary a Hugging Face style model declares (`config.vocab_size`), if any:
    what a teacher without its own `vocab:` is checked against."""
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return Vocabulary(size=size) if isinstance(size, int) and size > 0 else None


def masked_objective(objective: DistillObjective) -> DistillObjective:
    """The same terms, each given the loss mask (`mask=`), so masked positions count nowhere."""
    terms = [t.model_copy(update={"masked": True}) for t in objective.terms]
    return DistillObjective(terms, task_weight=objective.task_weight)


def _forward_params(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # a builtin or C++ forward: assume the usual names
        return {"input_ids", "attention_mask", "position_ids"}


def _flat_knowledge(
    knowledge: Mapping[str, Tensor], lengths: Tensor, ids: Tensor
) -> dict[str, Tensor]:
    """Token-level knowledge as `[N, ...]` rows in the batch's position order, each item's
    length checked against the student's."""
    rows: dict[str, Tensor] = {}
    for key, value in knowledge.items():
        if key == SAMPLE_ID:
            continue
        if not value.is_nested:
            raise ValueError(
                f"knowledge column {key!r} holds one value per sample ({list(value.shape)}), "
                f"not one per token: a causal_lm student distils token-level knowledge (a "
                f"teacher run on the same token items)"
            )
        got = jagged_offsets(value).diff().to(lengths.device)
        if not torch.equal(got, lengths):
            bad = int(torch.nonzero(got != lengths)[0])
            raise ValueError(
                f"knowledge column {key!r}: sample {int(ids[bad])} has {int(got[bad])} "
                f"positions in the teacher's knowledge but {int(lengths[bad])} real tokens in "
                f"the student's batch: the knowledge must come from the same token items "
                f"(same tokenizer, same attention masks)"
            )
        rows[key] = value.values()
    return rows


class CausalLMTask:
    """Loss and validation of a causal-LM student (see the module docstring)."""

    def __init__(
        self,
        config: LMConfig,
        model: nn.Module,
        *,
        labeled: int | None = None,
        teacher_vocab: Vocabulary | None = None,
    ) -> None:
        self.config = config
        self.collate = LMCollate(labels=config.labels, pack_tokens=config.pack_tokens)
        self.labeled = labeled
        self.teacher_vocab = teacher_vocab
        params = _forward_params(model)
        self.takes_mask = "attention_mask" in params
        self.takes_positions = "position_ids" in params
        if config.pack_tokens is not None and not (self.takes_mask and self.takes_positions):
            raise ValueError(
                f"lm.pack_tokens needs a student whose forward takes attention_mask and "
                f"position_ids (a Hugging Face causal LM does); "
                f"{type(model).__name__}.forward takes {sorted(params)}. Leave out pack_tokens"
            )
        self.mask_dtype = next(
            (p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32
        )
        self.validation_knowledge: OfflineKnowledge | None = None

    @classmethod
    def for_run(
        cls,
        config: TrainConfig,
        model: nn.Module,
        sources: Mapping[str, KnowledgeSource],
        val_set: torch.utils.data.Dataset | None,
    ) -> CausalLMTask:
        """The task of a trainer config, its validation dump opened (and checked against
        `val_set`)."""
        lm = config.lm_config
        vocabs = [s.schema.vocab for s in sources.values() if s.schema.vocab is not None]
        task = cls(
            lm,
            model,
            labeled=config.dataset.labeled,
            teacher_vocab=min(vocabs, key=lambda v: v.size, default=None),
        )
        if lm.validation_teacher is not None:
            if val_set is None:
                raise ValueError(
                    "lm.validation_teacher is a dump of the validation set, but the config "
                    "has no dataset.validation: add it, or remove validation_teacher"
                )
            task.validation_knowledge = OfflineKnowledge(lm.validation_teacher, val_set)
            try:
                _kl_loss(task.validation_knowledge.schema, lm.validation_field)  # refused now
            except ValueError:
                task.close()
                raise
        return task

    def close(self) -> None:
        if self.validation_knowledge is not None:
            self.validation_knowledge.close()

    def logits(self, net: nn.Module, inputs: Mapping[str, Tensor], packed: bool) -> Tensor:
        """`[N, V]`: the student's logits of the batch's real positions, in item order."""
        return self.row_logits(net, inputs, packed)[inputs["attention_mask"].bool()]

    def row_logits(self, net: nn.Module, inputs: Mapping[str, Tensor], packed: bool) -> Tensor:
        """`[R, L, V]`: the student's logits of every position of the batch's rows (padding
        included), the model run with the mask and position ids its forward takes."""
        real = inputs["attention_mask"]
        kwargs: dict[str, Tensor] = {"input_ids": inputs["input_ids"]}
        if packed:
            if not (self.takes_mask and self.takes_positions):
                raise ValueError(
                    "the dataset's items are packed (position_ids restart within an item), "
                    "but the student's forward takes no attention_mask and position_ids to "
                    "keep its documents apart"
                )
            kwargs["attention_mask"] = packed_mask(inputs["position_ids"], real, self.mask_dtype)
        elif self.takes_mask:
            kwargs["attention_mask"] = real
        if self.takes_positions:
            given = inputs.get("position_ids")
            kwargs["position_ids"] = (
                given if given is not None else (real.long().cumsum(-1) - 1).clamp(min=0)
            )
        out = net(**kwargs)
        if isinstance(out, Mapping):
            if self.config.logits not in out:
                raise ValueError(
                    f"lm.logits: the student's outputs have no {self.config.logits!r}; they "
                    f"have {sorted(out)}"
                )
            out = out[self.config.logits]
        if not isinstance(out, Tensor) or out.shape[:2] != real.shape:
            raise ValueError(
                f"the student's logits must be [rows, tokens, vocab] = [{real.shape[0]}, "
                f"{real.shape[1]}, V]; got {getattr(out, 'shape', type(out).__name__)}"
            )
        return out

    def _targets(
        self, inputs: Mapping[str, Tensor], targets: Mapping[str, Tensor], ids: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The real positions' targets and loss mask `[N]`; `labeled` hides later ids' labels."""
        real = inputs["attention_mask"].bool()
        labels, counts = targets["labels"][real], targets["loss_mask"][real]
        if self.labeled is not None:
            lengths = targets["lengths"]
            sample = torch.repeat_interleave(ids.to(lengths.device), lengths)
            labels = torch.where(
                sample < self.labeled, labels, torch.full_like(labels, IGNORE_INDEX)
            )
        return labels, counts

    def loss(
        self,
        net: nn.Module,
        inputs: Mapping[str, Tensor],
        targets: Mapping[str, Tensor],
        knowledge: Mapping[str, Tensor],
        objective: DistillObjective | None,
        task_weight: float,
    ) -> Tensor:
        """The step's total loss: task_weight * cross-entropy + the objective's terms."""
        ids = knowledge[SAMPLE_ID]
        logits = self.logits(net, inputs, bool(targets["packed"]))
        labels, counts = self._targets(inputs, targets, ids)
        task = _cross_entropy(logits, labels, counts)
        if objective is None:
            return task_weight * task
        rows = _flat_knowledge(knowledge, targets["lengths"], ids)
        student = {self.config.logits: align_logits(logits, self.teacher_vocab)}
        return objective(student, rows, task_loss=task, mask=counts).total

    @torch.no_grad()
    def validate(
        self,
        model: nn.Module,
        dataset: torch.utils.data.Dataset,
        batch_size: int,
        device: torch.device,
    ) -> LMValidation:
        """Perplexity (and the KL to the validation dump of `dataset`, if one was opened)
        over the counted targets."""
        teacher = self.validation_knowledge
        was_training = model.training
        model.eval()
        kl_loss = _kl_loss(teacher.schema, self.config.validation_field) if teacher else None
        ce_sum, ce_count, kl_sum, kl_count = 0.0, 0, 0.0, 0
        n = len(dataset)  # type: ignore[arg-type]
        try:
            for start in range(0, n, batch_size):
                ids = torch.arange(start, min(start + batch_size, n))
                inputs, targets = self.collate([dataset[int(i)] for i in ids])
                inputs = {k: v.to(device) for k, v in inputs.items()}
                targets = {k: v.to(device) for k, v in targets.items()}
                logits = self.logits(model, inputs, bool(targets["packed"])).float()
                labels, counts = self._targets(inputs, targets, ids)
                labels = torch.where(counts, labels, torch.full_like(labels, IGNORE_INDEX))
                ce_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
                ce_count += int((labels != IGNORE_INDEX).sum())
                if teacher is not None and kl_loss is not None:
                    columns = teacher.get(ids).tensors
                    rows = _flat_knowledge(columns, targets["lengths"].cpu(), ids)
                    field = self.config.validation_field
                    pair = (f"{field}.values", f"{field}.indices")
                    know = (
                        (rows[pair[0]].to(device), rows[pair[1]].to(device))
                        if pair[0] in rows
                        else rows[field].to(device)
                    )
                    counted = int(counts.sum())
                    student = align_logits(logits, teacher.schema.vocab)
                    kl_sum += float(kl_loss(student, know, mask=counts)) * counted
                    kl_count += counted
        finally:
            model.train(was_training)
        perplexity = math.exp(ce_sum / ce_count) if ce_count else math.nan
        kl = kl_sum / kl_count if teacher is not None and kl_count else None
        return LMValidation(perplexity=perplexity, kl=kl, tokens=ce_count)


def _cross_entropy(logits: Tensor, labels: Tensor, counts: Tensor) -> Tensor:
    """Mean cross-entropy over the positions with a target that count; a zero that keeps the
    graph when there is none (a batch of prompts only, or of unlabelled ids)."""
    labels = torch.where(counts, labels, torch.full_like(labels, IGNORE_INDEX))
    if not bool((labels != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)


def _kl_loss(schema: KnowledgeSchema, field: str) -> nn.Module:
    """Forward KL at T = 1 on `field`: top-k with the leftover mass as one bucket when the
    teacher sent log-probs or probs (else renormalised), dense as it is."""
    spec = next((f for f in schema.fields if f.name == field), None)
    if spec is None:
        raise ValueError(
            f"lm.validation_field {field!r} is not in the validation teacher's knowledge; it "
            f"has {list(schema.names)}"
        )
    if isinstance(spec.encoding, TopK):
        return TopKKD.for_field(spec, 1.0, "zero" if spec.meaning == "logits" else "tail")
    return SoftLabelKD.for_field(spec, 1.0)
