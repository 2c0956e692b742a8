"""The hand-rolled DistillRequest/DistillReply framing must equal protobuf's own, byte for byte."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lyceum.proto import codec, wire
from lyceum.proto.codec import decode, to_ipc, to_record_batch
from lyceum.proto.schema import KnowledgeSchema, dense
from lyceum.v1 import knowledge_pb2 as pb

ids_strategy = st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=50)


@given(rid=st.integers(0, 2**64 - 1), payload=st.binary(max_size=3000))
def test_query_request_and_knowledge_reply_match_generated_classes(rid, payload):
    encoded = wire.encode_request(rid, inputs=payload)
    assert encoded == pb.DistillRequest(request_id=rid, inputs=payload).SerializeToString()
    parsed = wire.decode_request(encoded)
    assert parsed.request_id == rid and bytes(parsed.inputs) == payload and parsed.ids is None


@given(rid=st.integers(0, 2**64 - 1), rows=st.integers(1, 40))
def test_batch_reply_matches_generated_classes_and_decodes(rid, rows):
    schema = KnowledgeSchema(fields=(dense("logits", "float32", (7,)),))
    x = torch.randn(rows, 7)
    batch = to_record_batch(schema, range(rows), {"logits": x})
    reply = wire.encode_batch_reply(rid, batch)
    ipc = to_ipc(batch).to_pybytes()
    assert reply == pb.DistillReply(request_id=rid, knowledge=ipc).SerializeToString()
    back = wire.decode_reply(reply)
    assert back.request_id == rid and back.error_code == 0
    assert torch.equal(decode(back.knowledge, schema).tensors["logits"], x)


@given(rid=st.integers(0, 2**64 - 1), ids=ids_strategy)
def test_index_request_round_trips(rid, ids):
    encoded = wire.encode_request(rid, ids=ids)
    generated = pb.DistillRequest.FromString(encoded)
    assert generated.request_id == rid and list(generated.ids.ids) == ids
    parsed = wire.decode_request(generated.SerializeToString())
    assert parsed.ids.tolist() == ids and parsed.ids.dtype == np.uint64


def test_large_batch_reply_takes_the_exact_size_path_with_the_same_bytes():
    schema = KnowledgeSchema(fields=(dense("logits", "float32", (1000,)),))
    x = torch.randn(300, 1000)  # 1.2 MB: above JOIN_BELOW
    batch = to_record_batch(schema, range(300), {"logits": x})
    assert codec.ipc_size(batch) >= codec.JOIN_BELOW
    reply = wire.encode_batch_reply(9, batch)
    ipc = to_ipc(batch).to_pybytes()
    assert len(ipc) == codec.ipc_size(batch)
    assert reply == pb.DistillReply(request_id=9, knowledge=ipc).SerializeToString()
    assert torch.equal(decode(wire.decode_reply(reply).knowledge, schema).tensors["logits"], x)


def test_error_reply_and_unknown_fields():
    reply = wire.decode_reply(wire.encode_error_reply(7, 8, "queue is full"))
    assert (reply.request_id, reply.error_code, reply.error_message) == (7, 8, "queue is full")
    # An unknown field (number 15, varint) is skipped, as protobuf does.
    parsed = wire.decode_request(b"\x78\x01" + wire.encode_request(3, inputs=b"abc"))
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
