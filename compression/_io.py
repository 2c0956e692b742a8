"""How compression writes its files: atomically, with the mode every other output gets.

A sibling temp file renamed over the target means a crash mid-write leaves the previous file
intact instead of a truncated one (what resuming a sensitivity analysis or a search relies
on). The temp file is created with `os.open(..., 0o666)` so the kernel applies the umask, as
it does for `open()`: `tempfile.mkstemp` (and safetensors 0.8's `save_file`, which writes
through Rust's `tempfile`) create 0600 files, which the rename would keep, so a model written
that way was readable by its owner only while the report beside it was 0644.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a sibling temp file and a rename.

    An `OSError` (no space left, a read-only file system) names `path`, not the temp file,
    and leaves no temp file behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise _naming(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _naming(path, exc) from exc
        raise


def _naming(path: Path, exc: OSError) -> OSError:
    # OSError(errno, ...) comes back as the matching subclass (PermissionError, ...).
    return OSError(exc.errno, exc.strerror, str(path))


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """`payload` as indented JSON, written with `write_bytes_atomic`."""
    write_bytes_atomic(path, json.dumps(payload, indent=1).encode())
