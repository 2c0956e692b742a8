"""The stdlib text: held-out modules no training sequence comes from, a BPE trained on the
training modules, and sequences that decode back to the sources' own text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from lyceum.deploy.stdlib_text import END_OF_FILE, stdlib_files, stdlib_text, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("bpe") / "tokenizer.json", vocab_size=300)


def test_the_splits_are_disjoint_modules_of_the_stdlib() -> None:
    train, val = stdlib_files("train"), stdlib_files("val")
    assert not set(train) & set(val)
    assert len(val) == len(train + val) // 8  # every 8th module, in name order
    assert sorted(train + val) == sorted(train[0].parent.glob("*.py"))
    with pytest.raises(ValueError, match=r"unknown split 'test'; expected 'train' or 'val'"):
        stdlib_files("test")  # type: ignore[arg-type]


@pytest.mark.slow
def test_sequences_decode_to_the_first_modules_text(tokenizer: Path) -> None:
    bpe = Tokenizer.from_file(str(tokenizer))
    assert bpe.get_vocab_size() == 300
    assert bpe.token_to_id(END_OF_FILE) == 0
    data = stdlib_text(str(tokenizer), "val", n=4, seq_len=16)
    assert len(data) == 4
    item = data[2]
    assert item["input_ids"].shape == (16,) and item["input_ids"].dtype == torch.int64
    assert torch.equal(item["attention_mask"], torch.ones(16, dtype=torch.int64))
    ids = torch.cat([data[i]["input_ids"] for i in range(4)]).tolist()
    # The stream starts with the first held-out module (14 kB, far more than these 64
    # tokens), and byte-level BPE decodes losslessly.
    source = stdlib_files("val")[0].read_text(encoding="utf-8")
    text = bpe.decode(ids)
    assert source.startswith(text)
    assert len(text) > 64  # merges: more than one byte per token
    with pytest.raises(ValueError, match=r"the val split has \d+ tokens, .*asked for n=1000000"):
        stdlib_text(str(tokenizer), "val", n=1_000_000, seq_len=64)


def test_stdlib_text_says_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"tokenizer .*missing.json is not a file; make one"):
        stdlib_text(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match=r"vocab_size 100 is too small"):
        train_tokenizer(tmp_path / "t.json", vocab_size=100)
