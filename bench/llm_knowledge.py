"""Language-model knowledge: bytes per token, tokens/s by batching policy, knowledge-step memory,
and what 8-bit values cost a top-k loss.

Four tables, medians of `--repeats` runs:

1. Bytes per token of top-k knowledge as a dump stores it (Arrow IPC, the codec's layout),
   k = 8, 32, 128, at vocab 1,024 and 128,256 (synthetic log-probs of a peaked
   distribution), without and with Arrow's zstd body compression: fp16 values with indices
   in the fewest bits the vocabulary allows (16, and 17 bit-packed), next to format 1.0's
   int32; then format 1.2's codes: Elias-Fano indices (`--topk-indices elias_fano`), 8-bit
   values (`--topk-values uint8`), both; and the cost of encoding and decoding (decoded
   indices checked equal: lossless).
2. Teacher tokens/s of a tiny HF Llama (random weights) on sequences of 8-512 tokens spread
   log-normally like real text: batches of `--batch` samples (sample-count) vs token-budget
   batches (`plan_window`) at equal memory, i.e. a budget of `batch x 512` padded tokens,
   the largest batch the sample-count policy may form. Padding waste = 1 - real / computed.
3. Peak memory of the knowledge step (log-softmax + top-k 128) over bf16 logits of 4,096
   tokens at vocab 128,256: the whole `[T, V]` at once vs `_knowledge_step`'s chunks; each
   in a fresh subprocess, peak RSS above the logits themselves.
4. The error 8-bit values cost, per position, on the top-k log-probs of a tiny HF Llama
   (4 layers, vocab 1,024, random weights: flat distributions; and its logits x 10, peaked
   like a trained model's) and on the synthetic peaked ones of table 1: the largest value error, KL between the fp16 and the 8-bit top-k
   distributions (softmax over the k kept log-probs), and the relative change of the
   student's top-k KD loss (`topk_kd`, a random student) between the two.

    .venv/bin/python bench/llm_knowledge.py            # ~4-5 min on two cores
    .venv/bin/python bench/llm_knowledge.py --only bytes
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import torch

from lyceum.proto.codec import from_record_batch, to_record_batch
from lyceum.proto.schema import KnowledgeSchema, topk

BIG_VOCAB = 128_256
MEMORY_TOKENS = 4096


def _ipc_bytes(batch: pa.RecordBatch, compression: str | None) -> int:
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_file(sink, batch.schema, options=options) as writer:
        writer.write_batch(batch)
    return sink.getvalue().size


def _topk(vocab: int, k: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    values, indices = torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
    for _ in range(0, tokens, 512):  # 512 positions at a time: [T, V] fp32 is 4 GiB at 128k
        logits = torch.randn(512, vocab, generator=g) * 3
        v, i = torch.topk(torch.log_softmax(logits, -1), k, dim=-1)
        values, indices = torch.cat([values, v]), torch.cat([indices, i])
    return values[:tokens], indices[:tokens]


_CODES: dict[str, dict[str, object]] = {
    "fp16": {},
    "fp16 EF": {"index_code": "elias_fano"},
    "u8": {"value_bits": 8},
    "u8 EF": {"value_bits": 8, "index_code": "elias_fano"},
}
"""Format 1.2's storage options: Elias-Fano indices, 8-bit values, both."""


def _schema(vocab: int, k: int, **encoding: object) -> KnowledgeSchema:
    field = topk("logits", "float16", (None, vocab), k, "log_probs")
    if encoding:
        field = field.model_copy(update={"encoding": field.encoding.model_copy(update=encoding)})
    return KnowledgeSchema(fields=(field,))


def bytes_per_token(
    values: torch.Tensor, indices: torch.Tensor, vocab: int, **encoding: object
) -> tuple[float, float, float, float]:
    """Bytes per token stored plain and with zstd, and ms per 1,000 tokens to encode and to
    decode (the indices checked equal, as a set per position: lossless)."""
    tokens, k = values.shape
    lengths = [256] * (tokens // 256)
    schema = _schema(vocab, k, **encoding)
    columns = {
        "logits.values": list(torch.split(values.half(), lengths)),
        "logits.indices": list(torch.split(indices.int(), lengths)),
    }
    start = time.perf_counter()
    batch = to_record_batch(schema, np.arange(len(lengths)), columns)
    encoded = time.perf_counter() - start
    start = time.perf_counter()
    decoded = from_record_batch(batch, schema)
    decoded_s = time.perf_counter() - start
    got = decoded.tensors["logits.indices"].values()
    assert torch.equal(torch.sort(got, -1).values, torch.sort(indices.int(), -1).values)
    per_k = 1e6 / tokens
    return (
        _ipc_bytes(batch, None) / tokens,
        _ipc_bytes(batch, "zstd") / tokens,
        encoded * per_k,
        decoded_s * per_k,
    )


def table_bytes() -> None:
    print(
        "\n1. bytes per token on disk (goal at k=128: <= 300 without zstd, indices lossless); "
        "fp16: fp16 values, indices in `bits`; int32: format 1.0's indices; EF: Elias-Fano "
        "indices; u8: 8-bit values; (zstd); ms per 1k tokens to encode / decode"
    )
    names = ["int32", *_CODES]
    head = " ".join(f"{n:>8} {'(zstd)':>6}" for n in names)
    print(f"{'vocab':>8} {'k':>4} {'bits':>4} {head} {'enc ms':>7} {'dec ms':>7}")
    bytes_per_token(*_topk(1024, 8, 512), 1024)  # warm-up: first calls import and build
    for vocab in (1024, BIG_VOCAB):
        for k in (8, 32, 128):
            values, indices = _topk(vocab, k, 2048 if vocab > 10_000 else 8192)
            cells = [bytes_per_token(values, indices, vocab, index_bits=32)]
            cells += [bytes_per_token(values, indices, vocab, **c) for c in _CODES.values()]
            bits = _schema(vocab, k).fields[0].index_bits
            sizes = " ".join(f"{c[0]:>8.1f} {c[1]:>6.0f}" for c in cells)
            enc, dec = cells[-1][2], cells[-1][3]
            print(f"{vocab:>8} {k:>4} {bits:>4} {sizes} {enc:>7.2f} {dec:>7.2f}")
    print("(enc / dec ms: u8 EF; fp16 with fixed indices is in the README's earlier table)")


def _lengths(n: int, seed: int) -> list[int]:
    g = np.random.default_rng(seed)
    return [int(x) for x in np.clip(np.exp(g.normal(np.log(96), 0.9, n)), 8, 512)]


def table_throughput(repeats: int, batch: int) -> None:
    from lyceum.deploy.examples import tiny_llama
    from lyceum.teacher_server._token_batches import padded_size, plan_window
    from lyceum.teacher_server.engine import EngineConfig, OutputSpec, TeacherEngine

    torch.set_num_threads(2)
    model = tiny_llama(vocab=1024, layers=2, hidden=64)
    config = EngineConfig(
        outputs=(OutputSpec.parse("logits=@output.logits"),), topk=32, values="log_probs"
    )
    lengths = _lengths(96, 0)
    g = torch.Generator().manual_seed(1)
    samples = [{"input_ids": torch.randint(1, 1024, (n,), generator=g)} for n in lengths]
    engine = TeacherEngine(model, config, samples[0])
    ids = list(range(len(samples)))
    counted = [ids[lo : lo + batch] for lo in range(0, len(ids), batch)]
    budget = batch * 512
    plan = plan_window(ids, lengths, budget, max_samples=len(ids))
    policies = {"sample-count": counted, "token-budget": plan.batches}
    results: dict[str, list[float]] = {name: [] for name in policies}
    waste: dict[str, float] = {}
    for name, batches in policies.items():
        padded = sum(padded_size([lengths[i] for i in b]) for b in batches)
        waste[name] = 1 - sum(lengths) / padded
    for _ in range(repeats):
        for name, batches in policies.items():
            started = time.perf_counter()
            for b in batches:
                engine.infer(engine.collate_batch([samples[i] for i in b]))
            results[name].append(sum(lengths) / (time.perf_counter() - started))
    base = statistics.median(results["sample-count"])
    print(
        f"\n2. teacher tokens/s, tiny Llama (2 layers, hidden 64, vocab 1,024, top-32), "
        f"{len(lengths)} sequences of 8-512 tokens (median {int(np.median(lengths))}), "
        f"budget {budget} padded tokens = {batch} x 512 (goal: >= 1.3x, waste <= 10%)"
    )
    print(
        f"{'policy':<14} {'tokens/s':>10} {'vs samples':>11} {'padding waste':>14} {'batches':>8}"
    )
    for name, batches in policies.items():
        rate = statistics.median(results[name])
        print(
            f"{name:<14} {rate:>10.0f} {rate / base:>10.2f}x {100 * waste[name]:>13.1f}% "
            f"{len(batches):>8}"
        )


def _memory_child(mode: str) -> None:
    from lyceum.proto.schema import topk as topk_field
    from lyceum.teacher_server._knowledge_step import TokenStep, chunk_rows_for, token_columns

    # Filled in place: randn would make a float32 copy first and raise the peak measured
    # before the step.
    logits = torch.empty(1, MEMORY_TOKENS, BIG_VOCAB, dtype=torch.bfloat16).normal_()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "full":
        lp = torch.log_softmax(logits.float(), dim=-1)
        values, indices = torch.topk(lp, 128, dim=-1)
        values.half(), indices.int()
    else:
        spec = topk_field("logits", "float16", (None, BIG_VOCAB), 128, "log_probs")
        step = TokenStep(spec=spec, out_dtype=torch.float16, log_probs=True)
        rows = torch.arange(MEMORY_TOKENS)
        token_columns(step, logits, rows, chunk_rows_for(BIG_VOCAB, 64 << 20), 1.0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((peak - before) * 1024)


def table_memory() -> None:
    logits_mib = MEMORY_TOKENS * BIG_VOCAB * 2 / 2**20
    print(
        f"\n3. knowledge step peak memory above the bf16 logits ({logits_mib:.0f} MiB), "
        f"{MEMORY_TOKENS} tokens x vocab {BIG_VOCAB:,}, top-128 of log-softmax"
    )
    print(f"{'step':<22} {'extra peak':>11}")
    for mode, label in (("full", "full [T, V] float32"), ("chunked", "chunked (64 MiB)")):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", mode],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        extra = int(out.strip().splitlines()[-1])
        print(f"{label:<22} {extra / 2**20:>8.0f} MiB")


def _llama_top_log_probs(k: int, sharpen: float = 1.0) -> torch.Tensor:
    """Top-k log-probs of a tiny Llama (random weights) over 2,048 positions of random ids,
    its logits multiplied by `sharpen` (random weights give flat distributions; a trained
    model's are peaked)."""
    from lyceum.deploy.examples import tiny_llama

    model = tiny_llama(vocab=1024, layers=4, hidden=64)
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        logits = model(torch.randint(0, 1024, (8, 256), generator=g)).logits.reshape(-1, 1024)
    return torch.log_softmax(logits.float() * sharpen, -1).topk(k, dim=-1).values


def _eight_bit_error(values: torch.Tensor, vocab: int) -> tuple[float, float, float, float]:
    """Largest value error, mean and max KL(fp16 top-k || 8-bit top-k), and the relative
    change of a random student's top-k KD loss, for fp16 top-k log-probs `[N, k]`."""
    from lyceum.proto._topk_values import decode_values, encode_values
    from lyceum.student_client.losses import topk_kd

    fp16 = values.half().float()
    coded = torch.from_numpy(decode_values(encode_values(fp16.numpy(), "bench"), fp16.shape[1]))
    coded = coded.half().float()  # what a float16 field decodes to
    p_log, q_log = torch.log_softmax(fp16, -1), torch.log_softmax(coded, -1)
    kl = (p_log.exp() * (p_log - q_log)).sum(-1)
    g = torch.Generator().manual_seed(4)
    rows = min(512, fp16.shape[0])
    student = torch.randn(rows, vocab, generator=g) * 2
    idx = torch.stack([torch.randperm(vocab, generator=g)[: fp16.shape[1]] for _ in range(rows)])
    a = topk_kd(student, fp16[:rows], idx, meaning="log_probs")
    b = topk_kd(student, coded[:rows], idx, meaning="log_probs")
    err = float((coded - fp16).abs().max())
    return err, float(kl.mean()), float(kl.max()), abs(float(b - a)) / float(a)


def table_eight_bit() -> None:
    print(
        "\n4. what 8-bit values cost (--topk-values uint8), per position: the largest value "
        "error, KL(fp16 top-k || 8-bit top-k) in nats, relative change of a top-k KD loss"
    )
    print(
        f"{'log-probs':<22} {'k':>4} {'span':>6} {'max err':>8} {'mean KL':>9} {'max KL':>9} "
        f"{'loss change':>11}"
    )
    for k in (8, 32, 128):
        for name, values, vocab in (
            ("tiny Llama, V=1,024", _llama_top_log_probs(k), 1024),
            ("tiny Llama x 10", _llama_top_log_probs(k, 10.0), 1024),
            (f"peaked, V={BIG_VOCAB:,}", _topk(BIG_VOCAB, k, 1024)[0], BIG_VOCAB),
        ):
            span = float((values[:, 0] - values[:, -1]).median())
            err, kl_mean, kl_max, change = _eight_bit_error(values, vocab)
            print(
                f"{name:<22} {k:>4} {span:>6.2f} {err:>8.4f} {kl_mean:>9.2e} {kl_max:>9.2e} "
                f"{change:>11.2e}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--only", choices=("bytes", "throughput", "memory", "eight-bit"))
    parser.add_argument("--memory-child", choices=("full", "chunked"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        _memory_child(args.memory_child)
        return
    if args.only in (None, "bytes"):
        table_bytes()
    if args.only in (None, "throughput"):
        table_throughput(args.repeats, args.batch)
    if args.only in (None, "memory"):
        table_memory()
    if args.only in (None, "eight-bit"):
        table_eight_bit()


if __name__ == "__main__":
    main()
