"""Student throughput with and without distillation: `python bench/student.py`.

Workload: the digits training set, a student MLP (64 -> HIDDEN -> 10) trained with Adam, and
a teacher whose forward pass costs several times the student's step. On a 2-core machine a
real teacher that slow would take the student's own cores, so the teacher's compute is
simulated by a fixed sleep per forward (`sleep_teacher`: sleep, then a linear layer): it
occupies time, not CPU, which is what a teacher on its own GPU or node does to the student.

Rows (samples/s of the student: the median of interleaved epochs after a warm-up epoch):
  (a) no distillation: a torch DataLoader, cross-entropy only;
  (b) offline knowledge: DistillLoader over a dump of the same teacher;
  (c) online: DistillLoader over 1, 2 and 4 teacher server processes (replicas; gRPC, or
      ZeroMQ with --transport zmq);
  (d) the teacher computed inside the training loop, by hand;
  (e) the same teacher as an `InProcessTeacher` (what `teachers: {t: {model: ...}}` builds):
      in the student's process, its forward in the loader's producer thread.
`--cnn-teacher WIDTH` replaces the sleep by a real `teacher_cnn` computing on the student's
own CPU (rows a, b, d, e): an in-process teacher without a device of its own.
Each (c) row alternates with (b) while its servers run; there, every measured epoch follows an
unmeasured one of the same row (see `_Row.epoch`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

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

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        # Batched fetch (torch's protocol), as `lyceum.deploy.examples.Digits` has it.
        index = torch.tensor(indices, dtype=torch.int64)
        return list(zip(self.images[index].unbind(), self.labels[index].tolist(), strict=True))


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


class _Row:
    """One configuration: its own student and optimizer, and the rate of every epoch run."""

    def __init__(
        self, make_epoch: Callable[[], Iterable[Batch]], hidden: int, loader: Any = None
    ) -> None:
        self.make_epoch = make_epoch
        self.model = _student(hidden)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.loader = loader
        self.rates: list[float] = []
        self.waits: list[float] = []
        self.epoch()  # warm-up (connections, allocator, caches): not kept
        self.rates.clear()
        self.waits.clear()

    def epoch(self, lead_in: bool = False) -> None:
        """One measured epoch; `lead_in` runs an unmeasured one right before it, so the
        measured epoch starts as in real training: its first batches were requested while the
        previous epoch ended (`DistillLoader` prefetches across epochs), not during another
        row's epoch, which would hand the teachers free time."""
        if lead_in:
            _run(self.make_epoch(), self.model, self.optimizer)
        wait0 = self.loader.stats.wait_s if self.loader is not None else 0.0
        started = time.perf_counter()
        samples = _run(self.make_epoch(), self.model, self.optimizer)
        self.rates.append(samples / (time.perf_counter() - started))
        self.waits.append(self.loader.stats.wait_s - wait0 if self.loader is not None else 0.0)

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)

    @property
    def wait(self) -> float:
        return statistics.median(self.waits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096, help="student hidden width")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--ratio", type=float, default=3.0, help="teacher forward / student step")
    parser.add_argument("--times", type=int, default=8, help="digits repeated this many times")
    parser.add_argument("--epochs", type=int, default=5, help="measured epochs per row (median)")
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument(
        "--transport", choices=("grpc", "zmq"), default="grpc", help="how (c) reaches the teachers"
    )
    parser.add_argument(
        "--no-online", action="store_true", help="skip the (c) rows (teacher servers)"
    )
    parser.add_argument(
        "--cnn-teacher",
        type=int,
        default=0,
        metavar="WIDTH",
        help="instead of the sleep, a real teacher_cnn of this width computing on the "
        "student's CPU (no (c) rows): what an in-process teacher without a device of its "
        "own costs",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="teacher servers on the last core, the student on the others (Linux): shows how "
        "much of (c)'s gap is the teachers' CPU taking the student's core",
    )
    args = parser.parse_args()
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc hands the student's large activation buffers back to the OS after a step and
        # page-faults them in again at the next, by an amount that depends on what else was
        # allocated (the KD loss, the loader): +-30% between otherwise equal runs. Fixed
        # thresholds keep them mapped, the same for every row (and the teacher servers).
        os.environ.update(
            MALLOC_MMAP_THRESHOLD_=str(2**31 - 1), MALLOC_TRIM_THRESHOLD_=str(2**31 - 1)
        )
        os.execv(sys.executable, [sys.executable, *sys.argv])
    torch.set_num_threads(1)

    from lyceum.deploy.launcher import start_teacher
    from lyceum.proto.manifest import model_identity
    from lyceum.student_client.inprocess import InProcessTeacher
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

    def distill_epoch(loader: DistillLoader) -> Callable[[], Iterator[Batch]]:
        return lambda: ((x, y, k["logits"]) for x, y, k in loader)

    # Every row's epochs are interleaved with those of the rows it is compared with (a, b, d,
    # e in rounds; each (c) with b while its servers run), so that the load of other jobs on
    # this machine falls on both sides of each ratio; each figure is the median epoch.
    plain = _Row(plain_epoch, args.hidden)
    for _ in range(args.epochs):
        plain.epoch()
    step_ms = 1000 * bs / plain.rate
    delay_s = args.ratio * step_ms / 1000
    teacher: nn.Module = SleepTeacher(delay_s)
    if args.cnn_teacher:
        from lyceum.deploy.examples import teacher_cnn

        torch.manual_seed(0)
        teacher = teacher_cnn(width=args.cnn_teacher).eval()

    def inloop_epoch() -> Iterator[Batch]:
        loader = torch.utils.data.DataLoader(data, batch_size=bs, shuffle=True)
        for x, y in loader:
            with torch.inference_mode():
                t = teacher(x)
            yield x, y, t.clone()

    rows: list[tuple[str, float, float, float, str]] = []
    with tempfile.TemporaryDirectory(prefix="lyceum-bench-") as tmp:
        engine = TeacherEngine(teacher, EngineConfig(), data[0][0])
        dump_knowledge(
            engine,
            data,
            Path(tmp) / "dump",
            DumpConfig(batch_size=256, shard_rows=512, workers=0, progress=False),
            model_identity("bench:sleep_teacher", teacher),
        )
        offline_loader = DistillLoader(
            data,
            {"t": OfflineTeacher(Path(tmp) / "dump", data)},
            bs,
            shuffle=True,
            window=args.window,
        )
        offline = _Row(distill_epoch(offline_loader), args.hidden, offline_loader)
        inloop = _Row(inloop_epoch, args.hidden)
        inproc_loader = DistillLoader(
            data,
            {"t": InProcessTeacher(teacher, data[0][0])},
            bs,
            shuffle=True,
            window=args.window,
        )
        inproc = _Row(distill_epoch(inproc_loader), args.hidden, inproc_loader)
        for _ in range(args.epochs):
            for row in (plain, offline, inloop, inproc):
                row.epoch()
        base, offline_rate = plain.rate, offline.rate
        rows.append(
            (
                "(a) no distillation",
                base,
                1.0,
                offline_rate,
                f"student step {1000 * bs / base:.2f} ms",
            )
        )
        rows.append(
            (
                "(b) offline knowledge",
                offline_rate,
                offline.wait,
                offline_rate,
                "memory-mapped dump",
            )
        )
        rows.append(
            (
                "(d) teacher inside the loop",
                inloop.rate,
                0.0,
                offline_rate,
                "teacher forward on the critical path",
            )
        )
        rows.append(
            (
                "(e) in-process teacher",
                inproc.rate,
                inproc.wait,
                offline_rate,
                "InProcessTeacher: forward beside the step",
            )
        )

        env = {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
        spec = f'student:sleep_teacher{{"delay_s": {delay_s}}}'
        for replicas in () if args.no_online or args.cnn_teacher else (1, 2, 4):
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
                            grpc=args.transport == "grpc",
                            zmq=args.transport == "zmq",
                        )
                    )
                    for _ in range(replicas)
                ]
                if args.pin:
                    os.sched_setaffinity(0, cores[:-1])
                source = OnlineTeacher([s.endpoint(args.transport) for s in servers], mode="index")
                loader = DistillLoader(data, {"t": source}, bs, shuffle=True, window=args.window)
                online = _Row(distill_epoch(loader), args.hidden, loader)
                offline.rates.clear()
                for _ in range(args.epochs):
                    offline.epoch(lead_in=True)
                    online.epoch(lead_in=True)
                capacity = replicas * bs / delay_s
                rows.append(
                    (
                        f"(c) online, {replicas} replica{'s' if replicas > 1 else ''}",
                        online.rate,
                        online.wait,
                        offline.rate,
                        f"simulated teachers: at most {capacity:.0f} samples/s",
                    )
                )
                source.close()
                os.sched_setaffinity(0, cores)
    rows[2:] = [*rows[4:], *rows[2:4]]  # (d) and (e) last

    what = (
        f"teacher_cnn width {args.cnn_teacher} computing on the student's CPU"
        if args.cnn_teacher
        else f"fixed sleep of {1000 * delay_s:.1f} ms per batch (simulated compute; "
        f"{delay_s * 1000 / step_ms:.1f}x the student step); online teachers over {args.transport}"
    )
    print(
        f"student MLP 64-{args.hidden}-10, batch {bs}, digits train x{args.times} ({len(data)} samples), "
        f"median of {args.epochs} interleaved epochs after a warm-up; teacher = {what}"
    )
    print(
        f"{'configuration':<28} {'samples/s':>10} {'vs (a)':>7} {'vs (b)':>7} "
        f"{'wait s/epoch':>13}  note"
    )
    for name, rate, wait, against, note in rows:
        wait_text = f"{wait:>13.3f}" if not name.startswith("(a)") else f"{'-':>13}"
        print(
            f"{name:<28} {rate:>10.0f} {rate / base:>6.2f}x {rate / against:>6.2f}x "
            f"{wait_text}  {note}"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
