"""Vocabulary identity: which token ids a language-model teacher's knowledge is indexed by.

Top-k indices and scored log-probabilities are token ids of the teacher's vocabulary. A
student of another vocabulary would read them as other tokens (or index out of bounds), so
the knowledge schema carries the teacher's `Vocabulary`: its size and, when the teacher was
given its tokenizer, a sha256 of the token -> id mapping. The hash is computed the same way
from a `tokenizer.json` file (`tokenizer_sha256`, standard library only: no `transformers`
import) and from any tokenizer's `get_vocab()` mapping (`vocabulary_sha256`), so a student
with a Hugging Face tokenizer can compare without reading the file.

A student vocabulary padded beyond the teacher's (embedding tables rounded up to a multiple
of 64, same tokenizer) is aligned by `align_logits`: the padding ids are cut off, so they get
no probability mass and the loss equals that of an unpadded student.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # schema.py imports this module
    from lyceum.proto.schema import KnowledgeSchema

__all__ = [
    "Vocabulary",
    "align_logits",
    "check_student_vocabulary",
    "check_vocabulary",
    "tokenizer_sha256",
    "vocabulary_sha256",
]


class Vocabulary(BaseModel):
    """The vocabulary a teacher's token-level knowledge is indexed by."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(gt=0, description="Number of token ids (the logits' last dimension).")
    tokenizer_sha256: str | None = Field(
        default=None,
        description="sha256 of the tokenizer's token -> id mapping (`vocabulary_sha256`); "
        "None when the teacher was not given its tokenizer.",
    )


def vocabulary_sha256(vocab: Mapping[str, int]) -> str:
    """sha256 of a token -> id mapping, independent of its order (ids sorted)."""
    ordered = sorted(((int(i), str(t)) for t, i in vocab.items()), key=lambda p: p[0])
    text = json.dumps(ordered, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _tokenizer_vocab(raw: object, where: str) -> dict[str, int]:
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise ValueError(f"{where}: not a tokenizers JSON file (no 'model' object)")
    model_vocab = raw["model"].get("vocab")
    vocab: dict[str, int] = {}
    if isinstance(model_vocab, dict):  # BPE, WordPiece, WordLevel: token -> id
        vocab = {str(t): int(i) for t, i in model_vocab.items()}
    elif isinstance(model_vocab, list):  # Unigram: [token, score] in id order
        vocab = {str(entry[0]): i for i, entry in enumerate(model_vocab)}
    else:
        raise ValueError(f"{where}: the tokenizer's model has no vocabulary")
    for added in raw.get("added_tokens") or []:
        vocab[str(added["content"])] = int(added["id"])
    return vocab


def tokenizer_sha256(path: str | Path) -> str:
    """`vocabulary_sha256` of a `tokenizer.json` (or of the one in directory `path`); equal
    to `vocabulary_sha256(tokenizer.get_vocab())` for the tokenizer it holds."""
    file = Path(path)
    if file.is_dir():
        file = file / "tokenizer.json"
    where = f"tokenizer {str(file)!r}"
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc}); give a tokenizer.json file") from None
    return vocabulary_sha256(_tokenizer_vocab(raw, where))


def check_vocabulary(
    teacher: Vocabulary | None, student_size: int, student_sha256: str | None, where: str
) -> None:
    """Raise unless a student of `student_size` token ids (and tokenizer hash, if known) can
    read knowledge indexed by `teacher`'s vocabulary; a larger student vocabulary with the
    same tokenizer is padding (see `align_logits`)."""
    if teacher is None:
        return
    if teacher.tokenizer_sha256 and student_sha256 and teacher.tokenizer_sha256 != student_sha256:
        raise ValueError(
            f"{where}: the teacher's tokenizer (vocabulary sha256 {teacher.tokenizer_sha256[:16]}) "
            f"is not the student's ({student_sha256[:16]}): token ids mean different tokens. "
            f"Distil with a teacher of the student's tokenizer"
        )
    if student_size < teacher.size:
        raise ValueError(
            f"{where}: the teacher's vocabulary has {teacher.size} token ids, the student's "
            f"only {student_size}: its knowledge names ids the student has no logits for. "
            f"Use a student with the teacher's tokenizer and at least {teacher.size} ids"
        )


def check_student_vocabulary(
    schema: KnowledgeSchema, student: Vocabulary | None, where: str
) -> None:
    """`check_vocabulary` of a student that declared its vocabulary against a teacher's
    schema (nothing to check if either has none)."""
    if student is not None:
        check_vocabulary(schema.vocab, student.size, student.tokenizer_sha256, where)


def align_logits(student_logits: torch.Tensor, teacher: Vocabulary | None) -> torch.Tensor:
    """The student's logits over the teacher's ids only (a view): padding ids beyond the
    teacher's vocabulary are dropped, so a softmax gives them no mass."""
    if teacher is None or student_logits.shape[-1] == teacher.size:
        return student_logits
    check_vocabulary(teacher, student_logits.shape[-1], None, "student logits")
    return student_logits[..., : teacher.size]
