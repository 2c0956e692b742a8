"""CURVE keys (ZeroMQ) as both sides read them: z85 text, inline or from a file.

The teacher reads its secret key and the student its keys the same way (a bare 40-character
z85 key, or a certificate written by `zmq.auth.create_certificates`), so one reader serves
both and a mistake gets the same message on either side, naming the option it came from.
"""

from __future__ import annotations

from pathlib import Path

import zmq.auth

__all__ = ["KEYGEN_HINT", "Z85_KEY_LEN", "read_curve_key", "z85_key"]

Z85_KEY_LEN = 40
_Z85_ALPHABET = frozenset(
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
)
KEYGEN_HINT = "create keys with zmq.curve_keypair() or zmq.auth.create_certificates"


def z85_key(key: str | bytes, option: str) -> bytes:
    """`key` as bytes, if it is a 40-character z85 CURVE key; else a `ValueError` naming it."""
    text = key.decode(errors="replace") if isinstance(key, bytes) else key
    if len(text) != Z85_KEY_LEN or not set(text) <= _Z85_ALPHABET:
        raise ValueError(
            f"{option!r}: expected a 40-character z85 CURVE key, got {len(text)} characters"
            f"{'' if len(text) != Z85_KEY_LEN else ' outside the z85 alphabet'}; {KEYGEN_HINT} "
            f"(in YAML, quote the key: z85 uses characters such as {{ & * # that YAML reads)"
        )
    return text.encode()


def read_curve_key(path: str | Path, option: str, secret: bool) -> bytes:
    """A z85 key from a bare key file or a zmq certificate (`zmq.auth` format): the secret
    key if `secret`, else the public one."""
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"{option!r}: cannot read CURVE key file {str(path)!r}: {exc}") from exc
    if len(text) == Z85_KEY_LEN and "\n" not in text:
        return z85_key(text, f"{option} ({path})")
    try:
        public, secret_key = zmq.auth.load_certificate(str(path))
    except (ValueError, OSError) as exc:
        raise ValueError(
            f"{option!r}: {str(path)!r} is neither a 40-character z85 key nor a zmq certificate "
            f"({exc}); {KEYGEN_HINT}"
        ) from exc
    key = secret_key if secret else public
    if key is None:
        raise ValueError(
            f"{option!r}: certificate {str(path)!r} holds no secret key; give the *.key_secret "
            f"file that zmq.auth.create_certificates wrote"
        )
    return key
