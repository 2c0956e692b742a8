"""Training the supernet: progressive shrinking samples only its phase's sets, in order; a run
resumed from its checkpoint equals one that never stopped; BN re-calibration of a subnet; a
teacher's knowledge teaches every subnet its own samples' rows."""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lyceum.compression.distillation import Distillation
from lyceum.compression.nas import (
    OFASpace,
    OFASpaceConfig,
    OFATrainConfig,
    Phase,
    SubnetConfig,
    Supernet,
    TeacherKnowledge,
    evaluate_subnet,
    extract,
    phase_allowed,
    progressive_shrinking,
    recalibrate_bn,
    train_supernet,
)
from lyceum.student_client.losses import soft_label_kd
from tests.compression.test_supernet import tiny_space

KD = functools.partial(soft_label_kd, temperature=2.0)


def tiny_data(n: int = 8, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    )


def test_the_default_schedule_is_once_for_alls() -> None:
    phases = progressive_shrinking(OFASpace(OFASpaceConfig()), epochs=3)
    assert [(p.name, p.kernels, p.depths, p.expands) for p in phases] == [
        ("largest", None, None, None),
        ("kernel", (3, 5, 7), None, None),
        ("depth-1", (3, 5, 7), (3, 4), None),
        ("depth-2", (3, 5, 7), (2, 3, 4), None),
        ("expand-1", (3, 5, 7), (2, 3, 4), (4, 6)),
        ("expand-2", (3, 5, 7), (2, 3, 4), (3, 4, 6)),
    ]
    assert {p.epochs for p in phases} == {3}


def test_each_phase_samples_only_configs_in_its_allowed_set_in_order() -> None:
    space = tiny_space(kernels=[3, 5, 7], depths=[1, 2, 3], expands=[2, 3, 4])
    phases = progressive_shrinking(space, epochs=1)
    seen: list[tuple[int, list[SubnetConfig]]] = []
    torch.manual_seed(0)
    train_supernet(
        Supernet(space),
        tiny_data(8),
        OFATrainConfig(phases=phases, batch_size=4, random_subnets=3),
        KD,
        progress=False,
        on_step=lambda phase, configs: seen.append((phase, configs)),
    )
    # Two steps per epoch, one epoch per phase, the phases in the schedule's order.
    assert [phase for phase, _ in seen] == [i for i in range(len(phases)) for _ in range(2)]
    c = space.config
    for index, configs in seen:
        allowed = phase_allowed(space, phases[index])
        # The sandwich: the largest first (the teacher), then the phase's smallest.
        assert configs[0] == space.largest()
        assert len(configs) == 1 or configs[1] == allowed.smallest()
        for config in configs:
            assert allowed.contains(config), (phases[index].name, config)
        blocks = [b for config in configs for b in config.active_blocks()]
        name = phases[index].name
        if name == "largest":
            assert configs == [space.largest()]
        if name == "kernel":
            assert {k for _, _, k, _ in blocks} == set(c.kernels)
            assert {d for config in configs for d in config.depths} == {c.depths[-1]}
        if name == "depth-1":
            assert {d for config in configs for d in config.depths} == {2, 3}
        expands = {e for _, _, _, e in blocks}
        if not name.startswith("expand"):
            assert expands == {4}
        if name == "expand-1":
            assert expands == {3, 4}
        if name == "expand-2":
            assert expands == {2, 3, 4}
    with pytest.raises(ValueError, match="every set must include the space's largest value"):
        phase_allowed(space, Phase(name="bad", epochs=1, kernels=(3, 5)))


def _state(net: Supernet) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


class _Stop(Exception):
    pass


def test_a_resumed_run_takes_the_same_steps_as_one_that_never_stopped(tmp_path: Path) -> None:
    space = tiny_space()
    # Expansion elastic in the phase resumed mid-way: Adam's state and the sort must round-trip.
    phases = (
        Phase(name="largest", epochs=1),
        Phase(name="all", epochs=2, kernels=(3, 5), depths=(1, 2), expands=(2, 3)),
    )
    config = OFATrainConfig(phases=phases, batch_size=4, random_subnets=1)
    data = tiny_data(8)

    torch.manual_seed(0)
    straight = Supernet(space, kernel_transform=True)
    train_supernet(straight, data, config, KD, progress=False)

    torch.manual_seed(0)
    first = Supernet(space, kernel_transform=True)
    steps = 0

    def stop_in_third_epoch(phase: int, configs: list[SubnetConfig]) -> None:
        nonlocal steps
        steps += 1
        if steps == 5:  # the first step of epoch 3, after epoch 2's checkpoint
            raise _Stop

    with pytest.raises(_Stop):
        train_supernet(
            first,
            data,
            config,
            KD,
            checkpoint_dir=tmp_path,
            progress=False,
            on_step=stop_in_third_epoch,
        )
    state = (tmp_path / "state.json").read_text()
    assert '"epochs_done": 2' in state
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "optim-0002.safetensors",
        "state.json",
        "supernet-0002.safetensors",
    ]

    torch.manual_seed(1)  # other initial weights: the checkpoint must replace them all
    resumed = Supernet(space, kernel_transform=True)
    records = train_supernet(
        resumed, data, config, KD, checkpoint_dir=tmp_path, resume=True, progress=False
    )
    assert [(r.phase, r.epoch) for r in records] == [("all", 3)]
    expected, got = _state(straight), _state(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0, msg=key)

    other = OFATrainConfig(phases=phases, batch_size=4, random_subnets=1, lr=1e-2)
    with pytest.raises(ValueError, match=r"another schedule.*it differs in config \(checkpoint"):
        train_supernet(
            Supernet(space, kernel_transform=True),
            data,
            other,
            KD,
            checkpoint_dir=tmp_path,
            resume=True,
        )
    with pytest.raises(ValueError, match="does not fit this supernet"):
        train_supernet(Supernet(space), data, config, KD, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="resume needs a checkpoint in checkpoint_dir"):
        train_supernet(
            Supernet(space), data, config, KD, checkpoint_dir=tmp_path / "none", resume=True
        )


def test_bn_recalibration_sets_a_subnets_statistics_from_its_own_batches() -> None:
    space = tiny_space()
    net = Supernet(space).eval()
    plain = extract(net, space.smallest())
    batches = [torch.randn(16, 1, 8, 8) * 3 + 1 for _ in range(3)]
    recalibrate_bn(plain, batches)
    stem = plain[0]
    assert isinstance(stem, nn.Sequential)
    conv, stem_bn = stem[0], stem[1]
    assert isinstance(stem_bn, nn.BatchNorm2d) and stem_bn.running_mean is not None
    assert not plain.training and stem_bn.momentum == 0.1
    # The stem's BN: the mean over the batches of each batch's per-channel mean.
    with torch.no_grad():
        means = torch.stack([conv(x).mean(dim=(0, 2, 3)) for x in batches]).mean(0)
    torch.testing.assert_close(stem_bn.running_mean, means, atol=1e-5, rtol=0)
    # The supernet's own statistics are untouched.
    supernet_bn = net.stem[1]
    assert isinstance(supernet_bn, nn.BatchNorm2d) and supernet_bn.running_mean is not None
    assert torch.equal(supernet_bn.running_mean, torch.zeros(space.config.stem_channels))
    accuracy = evaluate_subnet(
        net, space.smallest(), tiny_data(8), tiny_data(8, 1), batches=2, batch_size=4
    )
    assert 0.0 <= accuracy <= 1.0
    with pytest.raises(ValueError, match="no batches given"):
        recalibrate_bn(plain, [])


def _one_step_config() -> OFATrainConfig:
    """One phase (everything elastic) of one epoch, the whole tiny set in one batch."""
    phases = (Phase(name="all", epochs=1, kernels=(3, 5), depths=(1, 2), expands=(2, 3)),)
    return OFATrainConfig(phases=phases, batch_size=8, random_subnets=2)


def test_with_a_teacher_every_subnet_learns_its_rows_of_the_teachers_outputs() -> None:
    space, data = tiny_space(), tiny_data(8)
    inputs = torch.stack([data[i][0] for i in range(8)])
    outputs = torch.randn(8, 10, generator=torch.Generator().manual_seed(3))
    teacher = TeacherKnowledge(outputs=outputs, loss=KD, alpha=1.0)
    torch.manual_seed(0)
    net = Supernet(space)
    initial = copy.deepcopy(net)
    seen: list[list[SubnetConfig]] = []
    (record,) = train_supernet(
        net,
        data,
        _one_step_config(),
        KD,
        teacher=teacher,
        progress=False,
        on_step=lambda _, configs: seen.append(configs),
    )
    # By hand: each subnet of the step, the largest included, against the teacher's rows of the
    # same samples (the batch is the whole set, shuffled: a row taken by batch position, not
    # by sample index, would not match).
    (configs,) = seen
    assert configs[0] == space.largest() and len(configs) > 2
    initial.sort_channels()  # as train_supernet does first: the phase lets expansion shrink
    initial.train()
    expected = []
    with torch.no_grad():
        for subnet in configs:
            initial.set_active(subnet)
            expected.append(KD(initial(inputs), outputs).item())
    assert record.loss == pytest.approx(sum(expected) / len(expected), rel=1e-5)

    # A few more epochs: the largest and the smallest subnets move towards the teacher, and
    # closer than the same training distilled in place from the largest subnet does.
    config = OFATrainConfig(
        phases=(Phase(name="all", epochs=6, kernels=(3, 5), depths=(1, 2), expands=(2, 3)),),
        batch_size=4,
        random_subnets=1,
        lr=1e-2,
    )
    nets = {}
    for name, knowledge in (("taught", teacher), ("in place", None)):
        torch.manual_seed(0)
        nets[name] = Supernet(space)
        train_supernet(nets[name], data, config, KD, teacher=knowledge, progress=False)
    for subnet in (space.largest(), space.smallest()):
        kl = {}
        for name, supernet in (("initial", initial), *nets.items()):
            with torch.no_grad():
                model = recalibrate_bn(extract(supernet, subnet), [inputs])
                kl[name] = KD(model(inputs), outputs).item()
        assert kl["taught"] < kl["initial"] and kl["taught"] < kl["in place"], (subnet, kl)


def test_a_teacher_at_alpha_zero_trains_as_in_place_distillation_at_alpha_zero() -> None:
    # Both are cross-entropy alone for every subnet: equal weights mean the same shuffles and
    # the same subnets drawn, whether the batches carry sample indices or not.
    space, data = tiny_space(), tiny_data(8)
    config = _one_step_config().model_copy(
        update={"batch_size": 4, "distill": Distillation(alpha=0.0)}
    )
    teacher = TeacherKnowledge(outputs=torch.randn(8, 10), loss=KD, alpha=0.0)
    nets = []
    for knowledge in (None, teacher):
        torch.manual_seed(0)
        nets.append(Supernet(space))
        train_supernet(nets[-1], data, config, KD, teacher=knowledge, progress=False)
    expected, got = _state(nets[0]), _state(nets[1])
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=0, rtol=0, msg=key)


def test_a_teacher_of_another_set_and_a_resume_across_teacher_settings_are_refused(
    tmp_path: Path,
) -> None:
    space, data, config = tiny_space(), tiny_data(8), _one_step_config()
    short = TeacherKnowledge(outputs=torch.randn(7, 10), loss=KD, alpha=0.5)
    with pytest.raises(ValueError, match="teacher knowledge has 7 rows and the training set 8"):
        train_supernet(Supernet(space), data, config, KD, teacher=short, progress=False)
    teacher = TeacherKnowledge(outputs=torch.randn(8, 10), loss=KD, alpha=0.5)
    for first, then in ((None, teacher), (teacher, None)):
        directory = tmp_path / ("plain" if first is None else "taught")
        train_supernet(
            Supernet(space), data, config, KD, teacher=first, checkpoint_dir=directory,
            progress=False,
        )  # fmt: skip
        with pytest.raises(ValueError, match=r"it differs in teacher \(checkpoint"):
            train_supernet(
                Supernet(space), data, config, KD, teacher=then, checkpoint_dir=directory,
                resume=True, progress=False,
            )  # fmt: skip
    # Another teacher at the same alpha (another dump, another checkpoint) is refused too.
    other = TeacherKnowledge(outputs=torch.randn(8, 10), loss=KD, alpha=0.5)
    with pytest.raises(ValueError, match=r"it differs in teacher \(checkpoint"):
        train_supernet(
            Supernet(space), data, config, KD, teacher=other, checkpoint_dir=tmp_path / "taught",
            resume=True, progress=False,
        )  # fmt: skip


def test_each_phase_decays_its_learning_rate_by_a_cosine(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[float] = []
    step = torch.optim.Adam.step

    def spy(self: torch.optim.Adam, *args: object, **kwargs: object) -> object:
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    phases = (
        Phase(name="largest", epochs=1),
        Phase(name="kernel", epochs=1, kernels=(3, 5), lr=1e-3),
    )
    # 8 samples in batches of 2: 4 steps a phase, each phase from its own start value.
    config = OFATrainConfig(
        phases=phases, batch_size=2, random_subnets=0, lr=4e-3, lr_schedule="cosine"
    )
    train_supernet(Supernet(tiny_space()), tiny_data(8), config, KD, progress=False)
    cosine = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert seen == pytest.approx([4e-3 * c for c in cosine] + [1e-3 * c for c in cosine])
    seen.clear()
    flat = config.model_copy(update={"lr_schedule": "constant"})
    train_supernet(Supernet(tiny_space()), tiny_data(8), flat, KD, progress=False)
    assert seen == pytest.approx([4e-3] * 4 + [1e-3] * 4)
