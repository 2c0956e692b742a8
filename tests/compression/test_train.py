"""The one training loop: float pre-training, pruning fine-tuning, QAT and the demo's students."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from lyceum.compression.pruning.finetune import finetune
from lyceum.compression.training import train_epochs, train_steps

N = 12


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 4, generator=g)
    x[:, 0] = torch.arange(N, dtype=torch.float32)  # column 0 names the sample
    return TensorDataset(x, torch.randint(0, 3, (N,), generator=g))


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Linear(4, 3)


def test_full_batch_training_equals_hand_written_adam_steps() -> None:
    data = _data()
    model, reference = _model(), _model()
    train_epochs(model, data, epochs=3, lr=0.05, batch_size=N, seed=5)
    # One batch per epoch holds every sample, so the mean cross-entropy ignores the order.
    x, y = data.tensors
    optimizer = torch.optim.Adam(reference.parameters(), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        optimizer.step()
    assert not model.training
    assert not torch.equal(model.get_parameter("weight"), _model().get_parameter("weight"))
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want)


def _order(seed: int) -> list[list[int]]:
    """Sample ids of each epoch, in the order the loss saw them (batches of 5)."""
    seen: list[list[int]] = [[], []]

    def loss(outputs: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        epoch = 0 if sum(map(len, seen)) < N else 1
        seen[epoch] += inputs[:, 0].long().tolist()
        return nn.functional.cross_entropy(outputs, labels)

    train_epochs(_model(), _data(), epochs=2, lr=0.01, batch_size=5, seed=seed, loss_fn=loss)
    return seen


def test_each_epoch_is_a_seeded_shuffle_of_every_sample() -> None:
    first, second = _order(seed=3)
    assert sorted(first) == sorted(second) == list(range(N))
    assert first != second  # reshuffled every epoch
    assert _order(seed=3) == [first, second]
    assert _order(seed=4) != [first, second]


def test_pruning_finetune_is_the_shared_loop() -> None:
    data = _data()
    tuned, trained = _model(), _model()
    assert finetune(tuned, data, epochs=2, batch_size=5, lr=0.01, seed=3) is tuned
    train_epochs(trained, data, epochs=2, batch_size=5, lr=0.01, seed=3)
    assert not tuned.training
    for got, want in zip(tuned.parameters(), trained.parameters(), strict=True):
        assert torch.equal(got, want)
    # With a teacher the loss changes, not the loop: at alpha=0 the distilled loss is the
    # plain cross-entropy, so the weights are the same.
    student, teacher = _model(), _model()
    finetune(
        student,
        data,
        epochs=2,
        batch_size=5,
        lr=0.01,
        seed=3,
        teacher=teacher,
        distill_loss=lambda s, t: (s - t).pow(2).mean(),
        alpha=0.0,
    )
    for got, want in zip(student.parameters(), trained.parameters(), strict=True):
        torch.testing.assert_close(got, want)


def test_progress_counts_the_batches_of_every_epoch(progress_lines) -> None:
    train_epochs(_model(), _data(), epochs=2, lr=0.01, batch_size=5, seed=0, desc="fine-tune")
    # 12 samples in batches of 5: 3 batches an epoch. A short run logs its closing line only.
    [line] = progress_lines()
    assert line.startswith("fine-tune: 6/6 batch (100%), ")
    assert "epoch=2/2" in line and "loss=" in line
    finetune(_model(), _data(), epochs=2, batch_size=5, progress=False)
    train_epochs(_model(), _data(), epochs=0, lr=0.01, batch_size=5)  # nothing to count
    assert progress_lines() == [line]


def test_steps_over_batches_of_the_callers_own_equal_hand_written_adam_steps() -> None:
    # The demo's students: batches drawn with replacement, a loss that is more than CE.
    x, y = _data().tensors
    picks = [torch.tensor([0, 0, 3]), torch.tensor([11, 2, 2]), torch.tensor([5, 7, 0])]

    def loss(model: nn.Module, pick: torch.Tensor) -> torch.Tensor:
        out = model(x[pick])
        return nn.functional.cross_entropy(out, y[pick]) + 0.1 * out.pow(2).mean()

    model, reference = _model(), _model()
    train_steps(model, iter(picks), loss, lr=0.05, total=len(picks), progress=False)
    optimizer = torch.optim.Adam(reference.parameters(), lr=0.05)
    for pick in picks:
        optimizer.zero_grad()
        loss(reference, pick).backward()
        optimizer.step()
    assert not model.training
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(got, want)


def test_progress_of_steps_shows_the_epoch_of_the_last_batch(progress_lines) -> None:
    batches = [torch.tensor([i]) for i in range(5)]

    def loss(model: nn.Module, pick: torch.Tensor) -> torch.Tensor:
        x, y = _data().tensors
        return nn.functional.cross_entropy(model(x[pick]), y[pick])

    train_steps(_model(), batches, loss, lr=0.01, total=5, per_epoch=2, desc="steps")
    [line] = progress_lines()
    assert line.startswith("steps: 5/5 batch (100%), ")
    assert "epoch=3/3" in line  # 5 batches of 2 an epoch: the fifth is in the third epoch
