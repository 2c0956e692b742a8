"""The checks of a pipeline's stage windows, each refusal naming the key to change.

PaddleSlim's Compressor takes any `start_epoch`/`end_epoch` and finds out at run time (or
never) that QAT began before pruning or that two strategies fought over an epoch; here a
config that makes no sense is refused before anything runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lyceum.compression.pipeline.schema import PipelineConfig, Window, _StageBase

__all__ = ["check_windows"]


def _key(index: int, stage: _StageBase, field: str) -> str:
    return f"key 'stages.{index}.{field}' (stage {stage.name!r})"


def _span(window: Window) -> str:
    if window.end is None:
        return f"a point before epoch {window.start}"
    return f"epochs {window.start}-{window.end}"


def check_windows(config: PipelineConfig) -> None:
    """Raise `ValueError` naming the first key whose window makes no sense."""
    stages = config.stages
    names = [s.name for s in stages]
    for i, stage in enumerate(stages):
        if names.index(stage.name) != i:
            raise ValueError(
                f"{_key(i, stage, 'name')}: the name is taken by stage {names.index(stage.name)}; "
                f"give each stage its own name (it names its folder and its report row)"
            )
    forms = {s.windowed for s in stages}
    if len(forms) > 1:
        i = next(i for i, s in enumerate(stages) if s.windowed != stages[0].windowed)
        raise ValueError(
            f"{_key(i, stages[i], 'start_epoch')}: stages mix the two forms; give every stage "
            f"'epochs' (sequential) or every stage 'start_epoch'/'end_epoch' (epoch windows)"
        )
    windowed = stages[0].windowed
    total = config.total_epochs()
    if windowed and config.epochs is None:
        raise ValueError(
            "key 'epochs': required with epoch windows (the run's length, PaddleSlim's "
            "compressor.epoch)"
        )
    if not windowed and config.epochs is not None and config.epochs != total:
        raise ValueError(
            f"key 'epochs': {config.epochs}, but the sequential stages' epochs add up to "
            f"{total}; leave 'epochs' out or make them agree"
        )
    windows = config.windows()
    for i, (stage, window) in enumerate(zip(stages, windows, strict=True)):
        if window.end is not None and window.end >= total:
            raise ValueError(
                f"{_key(i, stage, 'end_epoch')}: {window.end} is outside the run's {total} "
                f"epochs (0-{total - 1}); raise 'epochs' or end the stage earlier"
            )
        if window.start > total:
            raise ValueError(
                f"{_key(i, stage, 'start_epoch')}: {window.start} is outside the run's {total} "
                f"epochs (a point stage may start at {total}, after the last one)"
            )
    _check_coverage(config, windows, total)
    _check_kinds(config, windows)
    _check_distill_from(config, windows)


def _check_coverage(config: PipelineConfig, windows: list[Window], total: int) -> None:
    covered = {e for w in windows for e in w.epochs}
    idle = [e for e in range(total) if e not in covered]
    if idle:
        raise ValueError(
            f"key 'epochs': epoch{'s' if len(idle) > 1 else ''} {_ranges(idle)} of {total} "
            f"{'are' if len(idle) > 1 else 'is'} in no stage's window: nothing would say how "
            f"to train {'them' if len(idle) > 1 else 'it'}; widen a window or lower 'epochs'"
        )
    trains = [
        (i, w)
        for i, (s, w) in enumerate(zip(config.stages, windows, strict=True))
        if s.kind == "train"
    ]
    for a, (i, wi) in enumerate(trains):
        for j, wj in trains[a + 1 :]:
            if set(wi.epochs) & set(wj.epochs):
                raise ValueError(
                    f"{_key(j, config.stages[j], 'start_epoch')}: its {_span(wj)} overlap train "
                    f"stage {config.stages[i].name!r} ({_span(wi)}); one train stage at a time "
                    f"(one loss per epoch): make the windows follow each other"
                )


def _check_kinds(config: PipelineConfig, windows: list[Window]) -> None:
    stages = config.stages
    for kind, why in (
        ("prune", "a pruned model is not pruned again: prune once to the combined target"),
        ("quantize", "an int8 model is not quantized again"),
    ):
        found = [i for i, s in enumerate(stages) if s.kind == kind]
        if len(found) > 1:
            raise ValueError(f"{_key(found[1], stages[found[1]], 'kind')}: a second {kind}; {why}")
    quant = next((i for i, s in enumerate(stages) if s.kind == "quantize"), None)
    if quant is None:
        return
    q, qw = stages[quant], windows[quant]
    for i, (stage, window) in enumerate(zip(stages, windows, strict=True)):
        if i == quant:
            continue
        starts_after = window.start > qw.start or (window.start == qw.start and i > quant)
        if starts_after:
            what = "quantization before pruning" if stage.kind == "prune" else "a stage after it"
            raise ValueError(
                f"{_key(i, stage, 'start_epoch')}: starts after quantize stage {q.name!r} "
                f"({_span(qw)}), which would put {what}; quantization comes last: start "
                f"{stage.name!r} earlier, or list it before {q.name!r} when both start at "
                f"epoch {qw.start}"
            )
        last_training = qw.end if qw.end is not None else qw.start - 1
        if window.end is not None and window.end > last_training:
            raise ValueError(
                f"{_key(i, stage, 'end_epoch')}: {stage.name!r} trains until epoch "
                f"{window.end}, after quantize stage {q.name!r} has converted the model to "
                f"int8 (at the end of epoch {last_training}); end it by epoch {last_training}"
            )


def _check_distill_from(config: PipelineConfig, windows: list[Window]) -> None:
    names = [s.name for s in config.stages]
    for i, stage in enumerate(config.stages):
        source = getattr(stage, "distill_from", None)
        if source is None:
            continue
        key = _key(i, stage, "distill_from")
        if source not in names or source == stage.name:
            raise ValueError(
                f"{key}: {source!r} names no earlier stage; the stages are {names}; a stage "
                f"reads the model of a stage that has ended before it starts"
            )
        j = names.index(source)
        w = windows[j]
        ended = w.start if w.end is None else w.end + 1
        if config.stages[j].kind == "quantize" or j > i or ended > windows[i].start:
            raise ValueError(
                f"{key}: stage {source!r} ({_span(w)}) has not written its model when "
                f"{stage.name!r} starts (epoch {windows[i].start}); distil from a float stage "
                f"that ends before it"
            )


def _ranges(epochs: list[int]) -> str:
    parts: list[str] = []
    start = prev = epochs[0]
    for e in [*epochs[1:], None]:
        if e is not None and e == prev + 1:
            prev = e
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if e is not None:
            start = prev = e
    return ", ".join(parts)
