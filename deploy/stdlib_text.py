"""Local text for language-model demos: the Python standard library's own sources.

No download: the text is the top-level `*.py` files of the running interpreter's standard
library, in name order, split by file (every `_VAL_EVERY`-th file is held out for validation,
so a held-out sequence comes from a module no training sequence saw). `train_tokenizer`
trains a byte-level BPE on the training files with `tokenizers` (in this process, seconds) and
saves it as a `tokenizer.json`; `stdlib_text(tokenizer=...)` cuts the split's token stream
into sequences of `seq_len` tokens, Hugging Face style items that a teacher dumps and a
`task: causal_lm` student trains on. The same tokenizer file and arguments give the same
items in every process (what the dump's dataset fingerprint checks).

Needs `tokenizers` (a dependency of the `hf` extra), imported only when used.
"""

from __future__ import annotations

import importlib.util
import sysconfig
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from lyceum.proto.vocab import tokenizer_sha256

if TYPE_CHECKING:
    from tokenizers import Tokenizer

TextSplit = Literal["train", "val"]

END_OF_FILE = "<|endoftext|>"
"""The special token between two files of the stream (id 0 of `train_tokenizer`'s vocabulary)."""

_VAL_EVERY = 8


def stdlib_files(split: TextSplit) -> list[Path]:
    """The split's source files: the standard library's top-level modules, in name order;
    every `_VAL_EVERY`-th one (from the last of the first group) is `val`, the rest `train`."""
    if split not in ("train", "val"):
        raise ValueError(f"stdlib text: unknown split {split!r}; expected 'train' or 'val'")
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    held_out = split == "val"
    return [f for i, f in enumerate(files) if (i % _VAL_EVERY == _VAL_EVERY - 1) == held_out]


def _require_tokenizers() -> None:
    if importlib.util.find_spec("tokenizers") is None:
        raise ValueError("the stdlib text needs tokenizers: pip install 'lyceum-kd[hf]'")


def train_tokenizer(path: str | Path, vocab_size: int = 1024) -> Path:
    """Train a byte-level BPE of `vocab_size` ids on the training files and save it to `path`
    (a `tokenizer.json`); returns `path`. Id 0 is `END_OF_FILE`."""
    if vocab_size < 257 + 1:
        raise ValueError(
            f"train_tokenizer: vocab_size {vocab_size} is too small; a byte-level BPE needs "
            f"its 256 bytes and the end-of-file token: give at least 258 (e.g. 1024)"
        )
    _require_tokenizers()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_FILE],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(f) for f in stdlib_files("train")], trainer)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out))
    return out


@cache
def _token_stream(
    tokenizer_path: str, vocabulary: str, split: TextSplit, tokens: int
) -> torch.Tensor:
    """The split's files tokenized and joined by `END_OF_FILE`, until `tokens` ids or the
    split's end; cached per process and vocabulary (`vocabulary`: its sha256, so a file
    rewritten with another tokenizer is read again), since every run builds its datasets."""
    _require_tokenizers()
    from tokenizers import Tokenizer

    tokenizer: Tokenizer = Tokenizer.from_file(tokenizer_path)
    end = tokenizer.token_to_id(END_OF_FILE)
    if end is None:
        raise ValueError(
            f"tokenizer {tokenizer_path}: it has no {END_OF_FILE!r} token; make it with "
            f"lyceum.deploy.stdlib_text.train_tokenizer"
        )
    ids: list[int] = []
    for file in stdlib_files(split):
        ids.extend(tokenizer.encode(file.read_text(encoding="utf-8", errors="replace")).ids)
        ids.append(end)
        if len(ids) >= tokens:
            break
    return torch.tensor(ids[:tokens], dtype=torch.int64)


class StdlibText(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """The first `n` sequences of `seq_len` tokens of a split's token stream; item `i` is
    `{"input_ids": [seq_len] int64, "attention_mask": ones}` (the targets are the next ids)."""

    def __init__(
        self, tokenizer: str | Path, split: TextSplit = "train", n: int = 512, seq_len: int = 64
    ) -> None:
        if n <= 0 or seq_len <= 1:
            raise ValueError(
                f"stdlib text: n must be > 0 and seq_len > 1 (a target needs a next token); "
                f"got n={n}, seq_len={seq_len}"
            )
        path = Path(tokenizer)
        if not path.is_file():
            raise ValueError(
                f"stdlib text: tokenizer {path} is not a file; make one with "
                f"lyceum.deploy.stdlib_text.train_tokenizer"
            )
        stream = _token_stream(str(path.resolve()), tokenizer_sha256(path), split, n * seq_len)
        if stream.numel() < n * seq_len:
            raise ValueError(
                f"stdlib text: the {split} split has {stream.numel()} tokens, "
                f"{stream.numel() // seq_len} sequences of {seq_len}; asked for n={n}: lower n "
                f"or seq_len"
            )
        self.split, self.seq_len = split, seq_len
        self.sequences = stream.view(n, seq_len)

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.sequences[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def stdlib_text(
    tokenizer: str, split: TextSplit = "train", n: int = 512, seq_len: int = 64
) -> StdlibText:
    """Dataset factory for specs: `lyceum.deploy.stdlib_text:stdlib_text` with kwargs
    `{"tokenizer": "work/tokenizer.json", "split": "val", "n": 128}`."""
    return StdlibText(tokenizer, split, n, seq_len)
