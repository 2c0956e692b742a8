"""Export a knowledge dump to Parquet or CSV for tools that cannot read its Arrow shards as is.

    export_knowledge("knowledge/", "knowledge.parquet", to="parquet", dtype="float32")

Why: a dump stores bfloat16 as its 16-bit pattern (pandas, polars and DuckDB show uint16
integers) and float16 as Arrow's halffloat (DuckDB refuses it: "Unsupported Internal Arrow
Type e"). The export widens every float field (float16, bfloat16, float32) to float32, which
is exact, and keeps integer fields (top-k indices) as they are; bool fields are 0/1 (uint8).

- Parquet keeps the dump's layout: one row per sample, `sample_id`, then one column per field
  (top-k fields: `NAME.values` and `NAME.indices`), each sample's values a fixed-size list of
  the flattened per-sample shape, sequences a list of those rows. The file's metadata holds
  the exported Lyceum schema (`lyceum.schema`) and the dump's manifest without its shard
  list (`lyceum.manifest`): teacher, dataset fingerprint, creation time.
- CSV has no lists: each value of a fixed-shape field gets a column of its own, `NAME[i]`
  (or `NAME[i,j]` for more dimensions, C order), so a 1000-class head is 1000 columns.
  Sequence fields (a variable leading dimension, e.g. token-level top-k) have no fixed
  number of columns and are refused: export them to Parquet.

The export streams: one record batch of the dump at a time is read, converted and written,
so a dump larger than memory exports in the memory of one record batch (4 MiB by default).
Each shard's checksum is checked before its first batch is read (`OfflineKnowledge`), and
the output is written to `OUT.tmp` and renamed when complete, so a failed export leaves no
file that looks whole.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import torch

from lyceum.proto.codec import KnowledgeBatch, arrow_schema, from_record_batch, to_record_batch
from lyceum.proto.display import Progress
from lyceum.proto.schema import FieldSpec, KnowledgeSchema, TopK
from lyceum.student_client.offline import OfflineKnowledge

__all__ = ["ExportDType", "ExportFormat", "ExportResult", "export_knowledge", "export_schema"]

log = logging.getLogger(__name__)

ExportFormat = Literal["parquet", "csv"]
ExportDType = Literal["float32"]

_FLOATS = ("float16", "bfloat16", "float32")
_MANIFEST_KEY = b"lyceum.manifest"


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote."""

    path: Path
    rows: int
    columns: tuple[str, ...]
    bytes: int


def export_schema(schema: KnowledgeSchema, dtype: ExportDType = "float32") -> KnowledgeSchema:
    """The schema of exported knowledge: float fields as `dtype`, top-k indices as int32 and
    top-k values as floats (a dump's bit-packed or Elias-Fano indices and 8-bit values mean
    nothing to other readers of Parquet), the rest unchanged."""
    fields = tuple(
        f.model_copy(update={"dtype": dtype}) if f.dtype in _FLOATS else f for f in schema.fields
    )
    fields = tuple(
        f.model_copy(
            update={
                "encoding": f.encoding.model_copy(
                    update={"index_bits": 32, "index_code": "fixed", "value_bits": None}
                )
            }
        )
        if isinstance(f.encoding, TopK)
        else f
        for f in fields
    )
    return schema.model_copy(update={"fields": fields})


def export_knowledge(
    directory: str | Path,
    out: str | Path,
    to: ExportFormat = "parquet",
    dtype: ExportDType = "float32",
    progress: bool = True,
) -> ExportResult:
    """Write the dump in `directory` to the file `out` (see the module docstring)."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"export: {str(out)!r} is a directory; give the path of a file to write")
    tmp = out.with_name(out.name + ".tmp")
    with OfflineKnowledge(directory, verify="first_touch") as knowledge:
        target = export_schema(knowledge.schema, dtype)
        if to == "csv":
            sequences = [f.describe() for f in knowledge.schema.fields if f.variable]
            if sequences:
                raise ValueError(
                    f"export: {str(directory)!r} holds sequence fields ({'; '.join(sequences)}), "
                    f"whose samples have different lengths; CSV has a fixed number of columns "
                    f"and no lists. Export to Parquet instead (--to parquet)"
                )
        manifest = knowledge.manifest.model_dump_json(exclude={"shards"}, exclude_none=True)
        try:
            writer = _Writer(tmp, to, target, manifest.encode())
            with (
                writer,
                Progress(
                    len(knowledge), f"export {out}", "samples", enabled=progress, log=log
                ) as bar,
            ):
                for batch in knowledge.record_batches():
                    decoded = from_record_batch(batch, knowledge.schema, str(directory))
                    writer.write(decoded)
                    bar.update(len(decoded))
            os.replace(tmp, out)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return ExportResult(out, len(knowledge), writer.columns, out.stat().st_size)


class _Writer:
    """One output file, written record batch by record batch."""

    def __init__(self, path: Path, to: ExportFormat, schema: KnowledgeSchema, source: bytes):
        self.schema = schema
        self.to = to
        if to == "parquet":
            arrow = arrow_schema(schema)
            arrow = arrow.with_metadata({**(arrow.metadata or {}), _MANIFEST_KEY: source})
            self._parquet: pq.ParquetWriter | None = pq.ParquetWriter(str(path), arrow)
            self._csv: pa_csv.CSVWriter | None = None
            self.columns: tuple[str, ...] = tuple(arrow.names)
        else:
            self._parquet = None
            fields = [pa.field("sample_id", pa.uint64(), nullable=False)]
            for spec in schema.fields:
                for column in spec.columns:
                    kind = _csv_type(spec, column)
                    fields += [pa.field(name, kind) for name in _csv_names(spec, column)]
            self._csv_schema = pa.schema(fields)
            self._csv = pa_csv.CSVWriter(str(path), self._csv_schema)
            self.columns = tuple(self._csv_schema.names)

    def write(self, batch: KnowledgeBatch) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for spec in self.schema.fields:
            for column in spec.columns:
                t = batch.tensors[column]
                if not column.endswith(".indices") and spec.dtype == "float32":
                    t = t.to(torch.float32)  # exact for float16 and bfloat16
                tensors[column] = t
        if self._parquet is not None:
            self._parquet.write_batch(to_record_batch(self.schema, batch.sample_ids, tensors))
            return
        assert self._csv is not None  # one of the two writers exists
        arrays: list[pa.Array] = [pa.array(batch.sample_ids.numpy(), type=pa.uint64())]
        for spec in self.schema.fields:
            for column in spec.columns:
                t = tensors[column]
                flat = (t.to(torch.uint8) if t.dtype == torch.bool else t).reshape(
                    len(batch), spec.row_size
                )
                arrays += [pa.array(flat[:, j].numpy()) for j in range(spec.row_size)]
        self._csv.write_batch(pa.RecordBatch.from_arrays(arrays, schema=self._csv_schema))

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._parquet is not None:
            self._parquet.close()
        if self._csv is not None:
            self._csv.close()


def _csv_type(spec: FieldSpec, column: str) -> pa.DataType:
    if column.endswith(".indices"):
        return pa.int32()
    return pa.uint8() if spec.dtype == "bool" else pa.from_numpy_dtype(np.dtype(spec.dtype))


def _csv_names(spec: FieldSpec, column: str) -> list[str]:
    shape = spec.row_shape
    if not shape:
        return [column]
    return [f"{column}[{','.join(map(str, index))}]" for index in np.ndindex(*shape)]
