"""Files that hold secrets (bearer tokens, private keys), as the teacher and the student read them.

One reader for both sides, so a token file gets the same checks and the same messages on
either: the token must be printable ASCII without spaces (it travels in an HTTP header), and
a file that group or others may read or write is reported.

Why a warning and not a refusal (ssh refuses private keys with open permissions): the places
teachers run put secrets in files readable by all by default (a Kubernetes Secret volume is
0644 unless `defaultMode` says otherwise, and so are most files in a container image), where
the only user is the service itself. Refusing would break those deployments for no gain; on
a machine people share, the warning names the file and the `chmod` that fixes it.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

__all__ = ["read_token_file", "warn_if_exposed"]

log = logging.getLogger("lyceum.secrets")


def warn_if_exposed(path: str | Path, option: str) -> bool:
    """Log a warning if group or others may read or write the secret file `path` (named by
    `option`, e.g. '--token-file'); returns True if it did. Symlinks are followed: what
    matters is the file the secret is read from."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if not mode & 0o077:
        return False
    who = " and ".join(name for name, bits in (("group", 0o070), ("others", 0o007)) if mode & bits)
    log.warning(
        "%s %r holds a secret but is accessible by %s (mode %04o); anyone who can read it "
        "can use it: run `chmod 600 %s`",
        option,
        str(path),
        who,
        mode,
        path,
    )
    return True


def read_token_file(path: str | Path, option: str) -> bytes:
    """The bearer token in `path` without surrounding whitespace (see the module docstring);
    `option` names where the path came from in messages ('--token-file', 'token_file')."""
    token = Path(path).read_bytes().strip()
    warn_if_exposed(path, option)
    if not token:
        raise ValueError(f"{option} {str(path)!r} is empty; put a random secret in it")
    if any(c < 0x21 or c > 0x7E for c in token):
        raise ValueError(
            f"{option} {str(path)!r}: the token must be printable ASCII without spaces "
            f"(it travels in an HTTP header), e.g. `openssl rand -hex 32`"
        )
    return token
