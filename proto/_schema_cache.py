"""The codec's one cache: what it derives from a schema once instead of once per message.

A teacher sends the same schema in every reply and a student decodes it in every reply, and
building, serialising, parsing and validating a schema was most of a small message's cost
(16x1000 fp32: encode 18 -> 6 us, decode 95 -> ~30-45 us with the cache). One entry per
Arrow schema (metadata included) holds:

- the Arrow schema of a `KnowledgeSchema` (`arrow`);
- its IPC schema message, serialised once (`message`);
- the schema messages received for it, so a stream whose first message was seen before needs
  only its batch parsed (`received`, `remember`);
- the validations against expected schemas that passed (`validated`).

Schemas are immutable, so entries never go stale; the cache holds the `CAPACITY` most
recently used ones (a peer sending a new schema per message churns it, but cannot grow it).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa

from lyceum.proto.schema import KnowledgeSchema

CAPACITY = 64

Validation = tuple[KnowledgeSchema | None, str]  # (expected schema, where: the error's prefix)


@dataclass(eq=False)
class SchemaEntry:
    """What the codec knows about one Arrow schema."""

    arrow: pa.Schema
    message: bytes | None = None  # its IPC schema message as this process serialises it
    keys: list[object] = field(default_factory=list)  # how the cache finds it
    validated: dict[Validation, KnowledgeSchema] = field(default_factory=dict)
    used: int = 0  # when it was last used (the cache's clock)


class SchemaCache:
    """Entries found by knowledge schema, by received schema message or by Arrow schema; the
    least recently used entry goes first when the cache is full.

    Thread-safe, and lookups take no lock (they run for every message, on every transport
    thread): the entries are an immutable tuple that changes replace, a use is a tick of a
    counter, and only adding an entry (and evicting one) locks.
    """

    def __init__(self, capacity: int = CAPACITY) -> None:
        self._capacity = capacity
        self._lock = threading.Lock()
        self._clock = itertools.count(1)
        # Every key of every entry: a KnowledgeSchema, or ("received", schema message bytes).
        # Arrow schemas are found by a scan of the entries instead (the last one found first):
        # equals() costs 0.07 us where hashing a pa.Schema costs ~5 us.
        self._index: dict[object, SchemaEntry] = {}
        self._entries: tuple[SchemaEntry, ...] = ()  # newest first
        self._last: SchemaEntry | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def arrow(self, schema: KnowledgeSchema) -> pa.Schema:
        """`schema.to_arrow()`, built once."""
        entry = self._index.get(schema)
        if entry is None:
            entry = self._add(SchemaEntry(schema.to_arrow()), schema)
        entry.used = next(self._clock)
        return entry.arrow

    def entry(self, arrow: pa.Schema) -> SchemaEntry:
        """The entry of an Arrow schema (metadata included), made if it is new."""
        last = self._last
        if last is not None and last.arrow.equals(arrow, check_metadata=True):
            last.used = next(self._clock)
            return last
        for entry in self._entries:
            if entry.arrow.equals(arrow, check_metadata=True):
                entry.used = next(self._clock)
                self._last = entry
                return entry
        entry = self._add(SchemaEntry(arrow), None)
        self._last = entry
        return entry

    def message(self, arrow: pa.Schema) -> bytes:
        """The IPC schema message a stream of `arrow` batches starts with."""
        entry = self.entry(arrow)
        if entry.message is None:
            entry.message = arrow.serialize().to_pybytes()
        return entry.message

    def received(self, message: bytes) -> SchemaEntry | None:
        """The entry of a schema message seen before (`remember`), or None."""
        entry = self._index.get(("received", message))
        if entry is not None:
            entry.used = next(self._clock)
        return entry

    def remember(self, message: bytes, arrow: pa.Schema) -> SchemaEntry:
        """Note that `message` is the schema message of `arrow` (parsed by the full reader)."""
        entry = self.entry(arrow)
        with self._lock:
            if entry in self._entries:  # else evicted meanwhile: it stays unfindable
                self._link(entry, ("received", message))
        return entry

    def validated(
        self,
        arrow: pa.Schema,
        expected: KnowledgeSchema | None,
        where: str,
        validate: Callable[[], KnowledgeSchema],
        entry: SchemaEntry | None = None,
    ) -> KnowledgeSchema:
        """`validate()`'s schema, run once per (Arrow schema, expected, where); a validation
        that raises is not remembered and raises again next time."""
        entry = entry if entry is not None else self.entry(arrow)
        schema = entry.validated.get((expected, where))
        if schema is None:
            schema = entry.validated[(expected, where)] = validate()
        return schema

    def _add(self, entry: SchemaEntry, key: object) -> SchemaEntry:
        with self._lock:
            known = self._index.get(key) if key is not None else None
            if known is not None:
                return known  # another thread added it meanwhile
            entry.used = next(self._clock)
            entries = (entry, *self._entries)
            if len(entries) > self._capacity:
                old = min(entries, key=lambda e: e.used)
                entries = tuple(e for e in entries if e is not old)
                for k in old.keys:
                    if self._index.get(k) is old:
                        del self._index[k]
                if self._last is old:
                    self._last = None
            self._entries = entries
            if key is not None:
                self._link(entry, key)
        return entry

    def _link(self, entry: SchemaEntry, key: object) -> None:
        if self._index.get(key) is not entry:
            self._index[key] = entry
            entry.keys.append(key)


SCHEMAS = SchemaCache()
"""The process's schema cache, shared by the codec's encode and decode paths."""
