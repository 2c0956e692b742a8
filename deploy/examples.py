"""Example models and the digits data set, named by spec strings in demos, tests and benches.

Everything here is small enough to train on two CPU cores in seconds. scikit-learn's bundled
digits (1,797 images of 8x8 pixels, ten classes) is the only data: no download at run time.
Each factory is a plain callable so that `--model lyceum.deploy.examples:teacher_cnn` and
`--dataset lyceum.deploy.examples:digits` work from the command line.
"""

from __future__ import annotations

from functools import cache
from typing import Literal

import numpy as np
import torch
from torch import nn

from lyceum.compression.training import train_epochs

Split = Literal["train", "val", "test", "all"]

_N_TEST = 360
_N_VAL = 180


@cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images.astype(np.float32) / 16.0)[:, None, :, :]
    labels = data.target.astype(np.int64)
    # A fixed permutation so that every process (teacher, student, dump) agrees on the
    # split and on what sample id N means.
    perm = np.random.default_rng(0).permutation(len(labels))
    return images, labels, perm


class Digits(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """Map-style digits split: item `i` is `(image [1, 8, 8] float32 in [0, 1], label)`.

    `limit` keeps only the first N items of the split (e.g. a small labelled subset).
    """

    def __init__(self, split: Split = "train", limit: int | None = None) -> None:
        images, labels, perm = _digits_arrays()
        n_train = len(perm) - _N_TEST - _N_VAL
        bounds = {
            "train": (0, n_train),
            "val": (n_train, n_train + _N_VAL),
            "test": (n_train + _N_VAL, len(perm)),
            "all": (0, len(perm)),
        }
        if split not in bounds:
            raise ValueError(f"digits: unknown split {split!r}; expected one of {sorted(bounds)}")
        lo, hi = bounds[split]
        index = perm[lo:hi]
        if limit is not None:
            if limit <= 0:
                raise ValueError(f"digits: limit must be positive, got {limit}")
            index = index[:limit]
        self.split = split
        self.images = torch.from_numpy(np.ascontiguousarray(images[index]))
        self.labels = torch.from_numpy(np.ascontiguousarray(labels[index]))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """Items `indices` in one gather: torch's batched-fetch protocol, used by DataLoader
        and by a teacher's index mode (2x cheaper than an `__getitem__` per id)."""
        index = torch.tensor(indices, dtype=torch.int64)
        return list(zip(self.images[index].unbind(), self.labels[index].tolist(), strict=True))


def digits(split: Split = "train", limit: int | None = None) -> Digits:
    """Dataset factory for specs: `lyceum.deploy.examples:digits` (kwargs `{"split": "test"}`)."""
    return Digits(split, limit)


def _conv_bn(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TeacherCNN(nn.Module):
    """The demo's teacher: three conv stages on 8x8 inputs, global pooling, a linear head."""

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.layer1 = _conv_bn(1, width)
        self.layer2 = nn.Sequential(_conv_bn(width, 2 * width), nn.MaxPool2d(2))
        self.layer3 = _conv_bn(2 * width, 2 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.head(torch.flatten(self.pool(x), 1))


def teacher_cnn(width: int = 32, num_classes: int = 10) -> TeacherCNN:
    return TeacherCNN(width, num_classes)


def student_mlp(hidden: int = 32, num_classes: int = 10) -> nn.Sequential:
    """The demo's student: a one-hidden-layer MLP on the flattened 8x8 image."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


class StudentCNN(nn.Module):
    """A small CNN student (conv, conv, linear head), the target of compression demos."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(1, width),
            _conv_bn(width, 2 * width, stride=2),
            _conv_bn(2 * width, 2 * width, stride=2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 2 * 2, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def student_cnn(width: int = 16, num_classes: int = 10) -> StudentCNN:
    return StudentCNN(width, num_classes)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with batch norm and an identity or 1x1 shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetCNN(nn.Module):
    """A ResNet-style CNN for 8x8 inputs: stem, three stages of basic blocks, pooled head."""

    def __init__(self, width: int = 16, blocks: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn(1, width)
        stages: list[nn.Module] = []
        cin = width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            for b in range(blocks):
                stages.append(BasicBlock(cin, cout, stride=2 if (i > 0 and b == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet_cnn(width: int = 16, blocks: int = 2, num_classes: int = 10) -> ResNetCNN:
    return ResNetCNN(width, blocks, num_classes)


class SeparableBlock(nn.Module):
    """MobileNetV1 block: a depthwise 3x3 conv then a pointwise 1x1 conv, each with BN + ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.depthwise = _conv_bn(cin, cin, stride=stride, groups=cin)
        self.pointwise = nn.Sequential(
            nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class MobileNetCNN(nn.Module):
    """A MobileNetV1-style CNN for 8x8 inputs built from depthwise separable blocks."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn(1, width)
        self.blocks = nn.Sequential(
            SeparableBlock(width, 2 * width),
            SeparableBlock(2 * width, 4 * width, stride=2),
            SeparableBlock(4 * width, 4 * width),
            SeparableBlock(4 * width, 8 * width, stride=2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def mobilenet_cnn(width: int = 16, num_classes: int = 10) -> MobileNetCNN:
    return MobileNetCNN(width, num_classes)


def train_classifier(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 1e-2,
    seed: int = 0,
) -> nn.Module:
    """Plain supervised training with Adam and cross-entropy, quietly (the one loop,
    `lyceum.compression.training.train_epochs`); returns the model in eval mode."""
    train_epochs(
        model, dataset, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=False
    )
    return model


class TinyCausalLM(nn.Module):
    """A tiny causal language model: embedding, a causal conv, a vocabulary head.

    Position t sees only tokens <= t, so right-padding a batch leaves real positions unchanged
    (what the teacher engine relies on for token-level knowledge).
    """

    def __init__(self, vocab: int = 50, dim: int = 16, context: int = 3) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Conv1d(dim, dim, context)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens).transpose(1, 2)
        x = torch.relu(self.mix(nn.functional.pad(x, (self.context - 1, 0))))
        return self.head(x.transpose(1, 2))


def tiny_lm(vocab: int = 50, dim: int = 16, context: int = 3) -> TinyCausalLM:
    return TinyCausalLM(vocab, dim, context)


class TokenSequences(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """Random token sequences of varying length (item: `(tokens [T_i] int64, 0)`), seeded."""

    def __init__(self, n: int = 64, vocab: int = 50, min_len: int = 3, max_len: int = 12) -> None:
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(min_len, max_len + 1, (n,), generator=g)
        self.items = [torch.randint(0, vocab, (int(n_),), generator=g) for n_ in lengths]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.items[i], 0


def token_sequences(
    n: int = 64, vocab: int = 50, min_len: int = 3, max_len: int = 12
) -> TokenSequences:
    return TokenSequences(n, vocab, min_len, max_len)


def tiny_llama(
    vocab: int = 1024,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    seed: int = 0,
    output_hidden_states: bool = False,
) -> nn.Module:
    """A Hugging Face Llama from a config with random weights (seeded; no hub access).

    Needs the `hf` extra (`transformers`), imported here only: the package itself never
    imports it. `output_hidden_states=True` makes `@output.hidden_states.N` available."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        raise ValueError("tiny_llama needs transformers: pip install 'lyceum-kd[hf]'") from None
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=4096,
        output_hidden_states=output_hidden_states,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


Padding = Literal["none", "left", "right", "packed"]


class TokenDocuments(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Seeded random token documents as Hugging Face style dict items.

    `padding`: "none" (`input_ids`, `attention_mask` of ones), "left" / "right" (each item
    padded with token 0 to `max_len`, the mask 0 there, as `generate` and padding collates
    leave them), "packed" (two documents per item, `position_ids` restarting at 0 for the
    second). Every item has `labels` (the next tokens, -100 at the end), which a teacher
    ignores. `score_ids=True` adds the next tokens as `score_ids` too (0 at the end), the input
    a teacher that scores tokens learns its inputs from (`teacher serve --score NAME`: the
    teacher of on-policy distillation's sampled estimator). `documents(i)` gives item i's
    documents unpadded, for checks."""

    def __init__(
        self,
        n: int = 32,
        vocab: int = 1024,
        min_len: int = 4,
        max_len: int = 24,
        padding: Padding = "none",
        seed: int = 0,
        score_ids: bool = False,
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.padding, self.max_len, self.score_ids = padding, max_len, score_ids
        per_item = 2 if padding == "packed" else 1
        lengths = torch.randint(min_len, max_len + 1, (n, per_item), generator=g)
        self.docs = [
            [torch.randint(1, vocab, (int(k),), generator=g) for k in row] for row in lengths
        ]

    def __len__(self) -> int:
        return len(self.docs)

    def documents(self, i: int) -> list[torch.Tensor]:
        return self.docs[i]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        docs = self.docs[i]
        ids = torch.cat(docs)
        mask = torch.ones_like(ids)
        item: dict[str, torch.Tensor] = {}
        if self.padding in ("left", "right"):
            pad = torch.zeros(self.max_len - ids.numel(), dtype=ids.dtype)
            first = self.padding == "left"
            ids = torch.cat([pad, ids] if first else [ids, pad])
            mask = torch.cat([pad, mask] if first else [mask, pad])
        if self.padding == "packed":
            item["position_ids"] = torch.cat([torch.arange(d.numel()) for d in docs])
        if self.score_ids:
            item["score_ids"] = torch.cat([ids[1:], torch.tensor([0])])
        labels = torch.cat([ids[1:], torch.tensor([-100])])
        return {"input_ids": ids, "attention_mask": mask, **item, "labels": labels}


def token_documents(
    n: int = 32,
    vocab: int = 1024,
    min_len: int = 4,
    max_len: int = 24,
    padding: Padding = "none",
    seed: int = 0,
    score_ids: bool = False,
) -> TokenDocuments:
    return TokenDocuments(n, vocab, min_len, max_len, padding, seed, score_ids)
