"""A DNS server for one name, in the test's own process: gRPC's c-ares resolver asks it when
a target names it as the authority, `dns://127.0.0.1:PORT/NAME:GRPC_PORT`.

It answers A queries for `name` with `addresses` (which the test may change while it runs),
AAAA queries for it with no records, and anything else with NXDOMAIN; it counts the A queries
it answered, so that a test can wait for gRPC to resolve the name again. Nothing outside the
process changes: no /etc/hosts lines, no system resolver settings.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_A, _AAAA, _IN = 1, 28, 1
_NXDOMAIN = 3
_HEADER = struct.Struct("!HHHHHH")


def _question(packet: bytes) -> tuple[str, int, int]:
    """(lower-case name, qtype, offset past the question) of a query's first question."""
    labels, at = [], _HEADER.size
    while packet[at]:
        length = packet[at]
        labels.append(packet[at + 1 : at + 1 + length].decode("ascii").lower())
        at += 1 + length
    qtype, _ = struct.unpack_from("!HH", packet, at + 1)
    return ".".join(labels), qtype, at + 5


class DnsResponder:
    """A UDP DNS responder on 127.0.0.1 (a free port) for `name`; see the module docstring."""

    def __init__(self, name: str, addresses: list[str], ttl_s: int = 0) -> None:
        self.name = name.lower().rstrip(".")
        self.addresses = list(addresses)
        self.ttl_s = ttl_s
        self.a_queries = 0
        self._lock = threading.Lock()
        self._answered = threading.Condition(self._lock)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name="dns-responder", daemon=True)

    def set_addresses(self, addresses: list[str]) -> None:
        with self._lock:
            self.addresses = list(addresses)

    def wait_for_queries(self, count: int, timeout_s: float) -> bool:
        """True once `count` A queries for the name have been answered in all."""
        with self._answered:
            return self._answered.wait_for(lambda: self.a_queries >= count, timeout_s)

    def _reply(self, query: bytes) -> bytes:
        ident, flags, _, _, _, _ = _HEADER.unpack_from(query)
        name, qtype, end = _question(query)
        records: list[bytes] = []
        rcode = 0 if name == self.name else _NXDOMAIN
        if rcode == 0 and qtype == _A:
            with self._lock:
                addresses = list(self.addresses)
            for address in addresses:
                # 0xC00C: the name is the question's, at offset 12.
                records.append(
                    struct.pack("!HHHIH", 0xC00C, _A, _IN, self.ttl_s, 4)
                    + socket.inet_aton(address)
                )
        # A response (QR), authoritative (AA), the query's RD bit, recursion available (RA).
        answer_flags = 0x8400 | (flags & 0x0100) | 0x0080 | rcode
        header = _HEADER.pack(ident, answer_flags, 1, len(records), 0, 0)
        return header + query[_HEADER.size : end] + b"".join(records)

    def _serve(self) -> None:
        while True:
            ready, _, _ = select.select([self._sock, self._wake_r], [], [])
            if self._wake_r in ready:
                return
            query, peer = self._sock.recvfrom(4096)
            reply = self._reply(query)
            self._sock.sendto(reply, peer)
            if _question(query)[:2] == (self.name, _A):
                with self._answered:
                    self.a_queries += 1
                    self._answered.notify_all()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._wake_w.send(b"x")
        self._thread.join(timeout=10)
        for s in (self._sock, self._wake_r, self._wake_w):
            s.close()


@contextmanager
def dns_responder(name: str, addresses: list[str]) -> Iterator[DnsResponder]:
    """A running `DnsResponder`, stopped when the block ends."""
    responder = DnsResponder(name, addresses)
    responder.start()
    try:
        yield responder
    finally:
        responder.stop()
