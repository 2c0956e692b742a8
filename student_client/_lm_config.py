"""The trainer config's language-model keys: `task: causal_lm` with its `lm:` section, and a
teacher's `vocab:` (the student's vocabulary its knowledge is checked against).

    task: causal_lm
    model: lyceum.deploy.examples:tiny_llama          # an HF model: @output.logits
    model_kwargs: {vocab: 1024, layers: 2, hidden: 32}
    dataset: {train: my_data:tokenized, validation: my_data:tokenized,
              validation_kwargs: {split: val}}
    teachers:
      llama: {dir: dumps/llama, vocab: {size: 1024, tokenizer: tokenizer.json}}
    lm: {labels: hf, pack_tokens: 512, validation_teacher: dumps/llama-val}
    losses:
      task_weight: 1.0
      terms: [{name: kd, kind: topk, field: logits, missing: tail, divergence: forward_kl}]

Import these names from `lyceum.student_client.trainer_config`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from lyceum.proto.vocab import Vocabulary, tokenizer_sha256
from lyceum.student_client._lm_collate import LabelStyle

__all__ = ["LMConfig", "VocabConfig"]


class VocabConfig(BaseModel):
    """The student's vocabulary, checked against a teacher's (`proto.vocab`): a student of
    another tokenizer, or of fewer ids than the teacher's, is refused before training."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(gt=0, description="Token ids of the student (its logits' last dim).")
    tokenizer: Path | None = Field(
        default=None,
        description="The student's tokenizer.json (or a directory holding one): its "
        "vocabulary's sha256 must equal the teacher's, when the teacher declared one.",
    )

    def vocabulary(self) -> Vocabulary:
        """As `OfflineTeacher(vocab=)` and `OnlineTeacher(vocab=)` take it."""
        sha = tokenizer_sha256(self.tokenizer) if self.tokenizer is not None else None
        return Vocabulary(size=self.size, tokenizer_sha256=sha)


class LMConfig(BaseModel):
    """How a `task: causal_lm` student reads its data and is validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    labels: LabelStyle = Field(
        default="hf",
        description="hf: items' labels are aligned with input_ids (position t learns "
        "labels[t + 1], the Hugging Face convention); next_token: already shifted (position t "
        "learns labels[t]). Items without labels learn the next input id.",
    )
    pack_tokens: int | None = Field(
        default=None,
        gt=0,
        description="Pack consecutive items of a batch into rows of at most this many tokens "
        "(position ids restart per document, no attention across documents); None: one "
        "right-padded row per item.",
    )
    logits: str = Field(
        default="logits",
        description="The student output holding the logits: a key of the mapping it returns "
        "(a Hugging Face model's `logits`, i.e. @output.logits); a model returning a tensor "
        "gives its logits directly.",
    )
    validation_teacher: Path | None = Field(
        default=None,
        description="An offline dump of the validation set's knowledge: each epoch then also "
        "reports the KL of the teacher to the student on it. None: perplexity only.",
    )
    validation_field: str = Field(
        default="logits",
        description="The top-k (or dense) field of validation_teacher the KL is computed on.",
    )
