"""Student throughput with and without distillation: `python bench/student.py`.

Workload: the digits training set, a student MLP (64 -> HIDDEN -> 10) trained with Adam, and
a teacher whose forward pass costs several times the student's step. On a 2-core machine a
real teacher that slow would take the student's own cores, so the teacher's compute is
simulated by a fixed sleep per forward (`sleep_teacher`: sleep, then a linear layer): it
occupies time, not CPU, which is what a teacher on its own GPU or node does to the student.

Rows (samples/s of the student, after one warm-up epoch):
  (a) no distillation: a torch DataLoader, cross-entropy only;
  (b) offline knowledge: DistillLoader over a dump of the same teacher;
  (c) online: DistillLoader over 1, 2 and 4 teacher server processes (replicas, gRPC);
  (d) the teacher computed inside the training loop.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent


class SleepTeacher(nn.Module):
    """A teacher whose forward costs `delay_s` of wall time and almost no CPU."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s
        torch.manual_seed(0)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay_s)
        return self.head(torch.flatten(x, 1))


def sleep_teacher(delay_s: float = 0.01) -> SleepTeacher:
    return SleepTeacher(delay_s)


class RepeatedDigits(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """The digits training split `times` over (ids 0..times*1257-1): epochs long enough that
    filling the window at the start of each is a small part of it."""

    def __init__(self, times: int) -> None:
        from lyceum.deploy.examples import digits

        base = digits("train")
        self.images = base.images.repeat(times, 1, 1, 1)
        self.labels = base.labels.repeat(times)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


def repeated_digits(times: int = 8) -> RepeatedDigits:
    return RepeatedDigits(times)


def _student(hidden: int) -> nn.Module:
    from lyceum.deploy.examples import student_mlp

    torch.manual_seed(0)
    return student_mlp(hidden=hidden)


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def _run(
    batches: Iterable[Batch],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
) -> int:
    """One epoch of training; returns the samples seen."""
    from lyceum.student_client.losses import soft_label_kd

    n = 0
    for x, y, teacher in batches:
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        if teacher is not None:
            loss = loss + soft_label_kd(logits, teacher, temperature=4.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n += len(y)
    return n


def _measure(make_epoch: Callable[[], Iterable[Batch]], hidden: int, epochs: int) -> float:
    """Best samples/s of `epochs` epochs after a warm-up epoch: other jobs share this
    machine's cores and slow down some epochs by a varying amount; the best epoch is the
    least disturbed one, the same statistic for every row."""
    model = _student(hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    _run(make_epoch(), model, optimizer)  # warm-up: connections, allocator, caches
    rates = []
    for _ in range(epochs):
        started = time.perf_counter()
        samples = _run(make_epoch(), model, optimizer)
        rates.append(samples / (time.perf_counter() - started))
    return max(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096, help="student hidden width")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--ratio", type=float, default=3.0, help="teacher forward / student step")
    parser.add_argument("--times", type=int, default=8, help="digits repeated this many times")
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs per row")
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument(
        "--pin",
        action="store_true",
        help="teacher servers on the last core, the student on the others (Linux): shows how "
        "much of (c)'s gap is the teachers' CPU taking the student's core",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)

    from lyceum.deploy.launcher import start_teacher
    from lyceum.proto.manifest import model_identity
    from lyceum.student_client.loader import DistillLoader
    from lyceum.student_client.sources import OfflineTeacher, OnlineTeacher
    from lyceum.teacher_server.dump import DumpConfig, dump_knowledge
    from lyceum.teacher_server.engine import EngineConfig, TeacherEngine

    data = RepeatedDigits(args.times)
    data_spec = f'student:repeated_digits{{"times": {args.times}}}'
    bs = args.batch_size

    def plain_epoch() -> Iterator[Batch]:
        loader = torch.utils.data.DataLoader(data, batch_size=bs, shuffle=True)
        return ((x, y, None) for x, y in loader)

    rows: list[tuple[str, float, float, str]] = []
    base = _measure(plain_epoch, args.hidden, args.epochs)
    step_ms = 1000 * bs / base
    delay_s = args.ratio * step_ms / 1000
    rows.append(("(a) no distillation", base, 0.0, f"student step {step_ms:.2f} ms"))

    def distill_rows(name: str, loader: DistillLoader, note: str) -> None:
        def epoch() -> Iterator[Batch]:
            return ((x, y, k["logits"]) for x, y, k in loader)

        wait0 = loader.stats.wait_s
        rate = _measure(epoch, args.hidden, args.epochs)
        wait = (loader.stats.wait_s - wait0) / (args.epochs + 1)
        rows.append((name, rate, wait, note))

    teacher = SleepTeacher(delay_s)
    with tempfile.TemporaryDirectory(prefix="lyceum-bench-") as tmp:
        engine = TeacherEngine(teacher, EngineConfig(), data[0][0])
        dump_knowledge(
            engine,
            data,
            Path(tmp) / "dump",
            DumpConfig(batch_size=256, shard_rows=512, workers=0, progress=False),
            model_identity("bench:sleep_teacher", teacher),
        )
        offline = OfflineTeacher(Path(tmp) / "dump", data)
        distill_rows(
            "(b) offline knowledge",
            DistillLoader(data, {"t": offline}, bs, shuffle=True, window=args.window),
            "memory-mapped dump",
        )

        env = {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
        spec = f'student:sleep_teacher{{"delay_s": {delay_s}}}'
        for replicas in (1, 2, 4):
            with ExitStack() as stack:
                cores = sorted(os.sched_getaffinity(0))
                if args.pin:  # children inherit the affinity they are started with
                    os.sched_setaffinity(0, cores[-1:])
                servers = [
                    stack.enter_context(
                        start_teacher(
                            spec,
                            dataset=data_spec,
                            max_batch=bs,
                            env=env,
                            exit_after_s=600,
                            extra_args=["--max-delay-ms", "0"],
                        )
                    )
                    for _ in range(replicas)
                ]
                if args.pin:
                    os.sched_setaffinity(0, cores[:-1])
                source = OnlineTeacher([s.endpoint("grpc") for s in servers], mode="index")
                loader = DistillLoader(data, {"t": source}, bs, shuffle=True, window=args.window)
                capacity = replicas * bs / delay_s
                distill_rows(
                    f"(c) online, {replicas} replica{'s' if replicas > 1 else ''}",
                    loader,
                    f"simulated teachers: at most {capacity:.0f} samples/s",
                )
                source.close()
                os.sched_setaffinity(0, cores)

    def inloop_epoch() -> Iterator[Batch]:
        loader = torch.utils.data.DataLoader(data, batch_size=bs, shuffle=True)
        for x, y in loader:
            with torch.inference_mode():
                t = teacher(x)
            yield x, y, t.clone()

    rate = _measure(inloop_epoch, args.hidden, args.epochs)
    rows.append(("(d) teacher inside the loop", rate, 0.0, "teacher forward on the critical path"))
    # (a) again, last: the better of the two runs, in case other jobs slowed the first.
    base = max(base, _measure(plain_epoch, args.hidden, args.epochs))
    rows[0] = ("(a) no distillation", base, 0.0, f"student step {1000 * bs / base:.2f} ms")
    offline_rate = rows[1][1]

    print(
        f"student MLP 64-{args.hidden}-10, batch {bs}, digits train x{args.times} ({len(data)} samples), "
        f"{args.epochs} epochs after a warm-up epoch; teacher = fixed sleep of {1000 * delay_s:.1f} ms "
        f"per batch (simulated compute; {delay_s * 1000 / step_ms:.1f}x the student step)"
    )
    print(
        f"{'configuration':<28} {'samples/s':>10} {'vs (a)':>7} {'vs (b)':>7} "
        f"{'wait s/epoch':>13}  note"
    )
    for name, rate, wait, note in rows:
        print(
            f"{name:<28} {rate:>10.0f} {rate / base:>6.2f}x {rate / offline_rate:>6.2f}x "
            f"{wait:>13.3f}  {note}"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
