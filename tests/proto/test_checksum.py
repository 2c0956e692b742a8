"""sha256 of files and buffers: the digests hashlib gives for the same bytes, whatever the size."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow as pa
import pytest

from lyceum.proto.checksum import file_sha256, sha256_buffer

# Empty, one byte, one 4 MiB step exactly, and steps plus a tail.
SIZES = [0, 1, 4 << 20, (9 << 20) + 3]


@pytest.mark.parametrize("size", SIZES)
def test_files_and_buffers_hash_as_hashlib_does(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "blob"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert file_sha256(path) == expected
    assert sha256_buffer(data) == expected
    with pa.memory_map(str(path)) as mapped:  # how students read shards
        assert sha256_buffer(mapped.read_buffer(size)) == expected


def test_a_stop_switch_ends_the_hashing_between_steps() -> None:
    data = bytes(9 << 20)  # three steps
    asked: list[int] = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) == 2

    assert sha256_buffer(data, stop) is None
    assert len(asked) == 2  # checked before each step: the second one stopped it
    assert sha256_buffer(data, lambda: False) == hashlib.sha256(data).hexdigest()


def test_a_missing_file_is_an_os_error_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        file_sha256(tmp_path / "gone.safetensors")
    assert err.value.filename == str(tmp_path / "gone.safetensors")
