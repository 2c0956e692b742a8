"""The hand-rolled DistillRequest/DistillReply framing must equal protobuf's own: byte for
byte for requests; for replies, field for field as the generated classes parse them (the
knowledge length is padded so the Arrow stream starts 8-byte aligned)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lyceum.proto import _ipc, wire
from lyceum.proto.codec import decode, to_ipc, to_record_batch
from lyceum.proto.schema import KnowledgeSchema, dense
from lyceum.v1 import knowledge_pb2 as pb

ids_strategy = st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=50)


@given(rid=st.integers(0, 2**64 - 1), payload=st.binary(max_size=3000))
def test_query_request_and_knowledge_reply_match_generated_classes(rid, payload):
    encoded = wire.encode_request(rid, inputs=payload)
    assert encoded == pb.DistillRequest(request_id=rid, inputs=payload).SerializeToString()
    parsed = wire.decode_request(encoded)
    assert parsed.inputs is not None and parsed.ids is None
    assert parsed.request_id == rid and bytes(parsed.inputs) == payload


@given(rid=st.integers(0, 2**64 - 1), rows=st.integers(1, 40))
def test_batch_reply_matches_generated_classes_and_decodes(rid, rows):
    schema = KnowledgeSchema(fields=(dense("logits", "float32", (7,)),))
    x = torch.randn(rows, 7)
    batch = to_record_batch(schema, range(rows), {"logits": x})
    reply = wire.encode_batch_reply(rid, batch)
    ipc = to_ipc(batch).to_pybytes()
    generated = pb.DistillReply.FromString(reply)
    assert generated.request_id == rid and generated.knowledge == ipc
    assert reply.endswith(ipc)
    if rid < 2**63:  # a 10-byte id leaves no room to pad some lengths
        assert (len(reply) - len(ipc)) % 8 == 0
    back = wire.decode_reply(reply)
    assert back.request_id == rid and back.error_code == 0
    assert torch.equal(decode(back.knowledge, schema).tensors["logits"], x)


@given(rid=st.integers(0, 2**64 - 1), ids=ids_strategy)
def test_index_request_round_trips(rid, ids):
    encoded = wire.encode_request(rid, ids=ids)
    generated = pb.DistillRequest.FromString(encoded)
    assert generated.request_id == rid and list(generated.ids.ids) == ids
    parsed = wire.decode_request(generated.SerializeToString())
    assert parsed.ids is not None
    assert parsed.ids.tolist() == ids and parsed.ids.dtype == np.uint64


def test_large_batch_reply_takes_the_exact_size_path_with_the_same_bytes():
    schema = KnowledgeSchema(fields=(dense("logits", "float32", (1000,)),))
    x = torch.randn(300, 1000)  # 1.2 MB: above JOIN_BELOW
    batch = to_record_batch(schema, range(300), {"logits": x})
    assert _ipc.ipc_size(batch) >= _ipc.JOIN_BELOW
    reply = wire.encode_batch_reply(9, batch)
    ipc = to_ipc(batch).to_pybytes()
    assert len(ipc) == _ipc.ipc_size(batch)
    assert pb.DistillReply.FromString(reply).knowledge == ipc and reply.endswith(ipc)
    got = decode(wire.decode_reply(reply).knowledge, schema).tensors["logits"]
    assert torch.equal(got, x)
    # Zero-copy and aligned: a view of the reply's own bytes at an 8-byte boundary.
    start = np.frombuffer(reply, dtype=np.uint8).ctypes.data
    assert start <= got.data_ptr() < start + len(reply)
    assert (got.data_ptr() - start) % 8 == 0


@given(rid=st.integers(0, 2**63 - 1), nbytes=st.integers(0, 2**31))
def test_knowledge_header_is_padded_to_eight_bytes(rid, nbytes):
    header = wire.knowledge_header(rid, nbytes)
    assert len(header) % 8 == 0 or nbytes >= 2**28  # 5-byte lengths may leave no room


@given(rid=st.integers(0, 2**64 - 1), nbytes=st.integers(0, 3000))
def test_padded_header_parses_with_generated_classes(rid, nbytes):
    message = wire.knowledge_header(rid, nbytes) + b"x" * nbytes
    generated = pb.DistillReply.FromString(message)
    assert generated.request_id == rid and len(generated.knowledge) == nbytes
    ours = wire.decode_reply(message)
    assert ours.request_id == rid and ours.knowledge is not None
    assert ours.knowledge.nbytes == nbytes


def test_error_reply_and_unknown_fields():
    reply = wire.decode_reply(wire.encode_error_reply(7, 8, "queue is full"))
    assert (reply.request_id, reply.error_code, reply.error_message) == (7, 8, "queue is full")
    # An unknown field (number 15, varint) is skipped, as protobuf does.
    parsed = wire.decode_request(b"\x78\x01" + wire.encode_request(3, inputs=b"abc"))
    assert parsed.inputs is not None
    assert parsed.request_id == 3 and bytes(parsed.inputs) == b"abc"


@pytest.mark.parametrize(
    ("data", "phrase"),
    [
        (b"\x08", "varint"),
        (b"\x12\x05ab", "runs past the end"),
        (b"\x00\x01", "field number 0"),
        (b"\x0b", "wire type 3"),
        (b"\x08\x05", "neither"),
    ],
)
def test_malformed_requests_raise_wire_error(data, phrase):
    with pytest.raises(wire.WireError, match=phrase):
        wire.decode_request(data)


@given(st.binary(max_size=200))
def test_decode_request_only_ever_raises_wire_error(data):
    try:
        request = wire.decode_request(data)
    except wire.WireError:
        return
    assert (request.inputs is None) != (request.ids is None)
