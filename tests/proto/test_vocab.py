"""Vocabulary identity: a tokenizer's hash from its file equals the one from its mapping,
a student of another vocabulary is refused, and a padded student vocabulary is aligned so
that the loss equals the unpadded case."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from lyceum.proto.schema import KnowledgeSchema, topk
from lyceum.proto.vocab import (
    Vocabulary,
    align_logits,
    check_vocabulary,
    tokenizer_sha256,
    vocabulary_sha256,
)
from lyceum.student_client.losses import topk_kd


def _train_tokenizer(vocab_size: int) -> Tokenizer:
    """A BPE tokenizer trained on the spot on a few of the standard library's sources."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [str(stdlib / name) for name in ("textwrap.py", "shlex.py", "glob.py")]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<eos>"])
    tokenizer.train(files, trainer)
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    _train_tokenizer(400).save(str(path))
    return path


def test_file_hash_equals_mapping_hash(tokenizer_file):
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    assert tokenizer_sha256(tokenizer_file) == vocabulary_sha256(tokenizer.get_vocab())
    assert tokenizer_sha256(tokenizer_file.parent) == tokenizer_sha256(tokenizer_file)
    other = _train_tokenizer(300)
    assert vocabulary_sha256(other.get_vocab()) != tokenizer_sha256(tokenizer_file)


def test_vocabulary_round_trips_in_the_schema_and_is_left_out_when_absent():
    field = topk("logits", "float16", (None, 1024), 8, meaning="log_probs")
    plain = KnowledgeSchema(fields=(field,))
    assert "vocab" not in plain.to_json()
    with_vocab = KnowledgeSchema(fields=(field,), vocab=Vocabulary(size=1024))
    assert KnowledgeSchema.from_json(with_vocab.to_json()) == with_vocab
    assert KnowledgeSchema.from_arrow(with_vocab.to_arrow()) == with_vocab
    assert with_vocab != plain


def test_another_vocabulary_is_refused():
    teacher = Vocabulary(size=1024, tokenizer_sha256="a" * 64)
    with pytest.raises(ValueError, match=r"has 1024 token ids, the student's only 1000"):
        check_vocabulary(teacher, 1000, None, "teacher 'lm'")
    with pytest.raises(ValueError, match=r"teacher 'lm': the teacher's tokenizer .* is not"):
        check_vocabulary(teacher, 1024, "b" * 64, "teacher 'lm'")
    check_vocabulary(teacher, 1088, "a" * 64, "teacher 'lm'")  # padding: accepted
    with pytest.raises(ValueError, match="only 1000"):
        align_logits(torch.zeros(2, 1000), teacher)


def test_padded_student_vocabulary_gives_the_unpadded_loss():
    g = torch.Generator().manual_seed(0)
    teacher = Vocabulary(size=1000)
    student = torch.randn(6, 1000, generator=g)
    # Rounded up to 1024 ids; the padding rows of an embedding table are trained too and
    # may carry any logit.
    padded = torch.cat([student, 5 + torch.randn(6, 24, generator=g)], dim=-1)
    values, indices = torch.topk(torch.log_softmax(torch.randn(6, 1000, generator=g), -1), 8)
    want = topk_kd(student, values, indices, meaning="log_probs", missing="uniform")
    got = topk_kd(
        align_logits(padded, teacher), values, indices, meaning="log_probs", missing="uniform"
    )
    assert torch.equal(got, want)
    assert align_logits(padded, teacher).data_ptr() == padded.data_ptr()  # a view
    # Unaligned, the padding ids take mass and the loss differs.
    assert not torch.allclose(
        topk_kd(padded, values, indices, meaning="log_probs", missing="uniform"), want
    )
