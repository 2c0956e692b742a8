"""What the teacher server and the student client share: the knowledge schema, the codec,
the generated gRPC stubs (`lyceum.v1`) and model/dataset specs."""

from lyceum.proto.codec import (
    KnowledgeBatch,
    decode,
    encode,
    from_record_batch,
    read_ipc,
    to_ipc,
    to_record_batch,
)
from lyceum.proto.schema import (
    FORMAT_VERSION,
    SAMPLE_ID,
    Dense,
    FieldSpec,
    KnowledgeSchema,
    TopK,
    dense,
    topk,
)

__all__ = [
    "FORMAT_VERSION",
    "SAMPLE_ID",
    "Dense",
    "FieldSpec",
    "KnowledgeBatch",
    "KnowledgeSchema",
    "TopK",
    "decode",
    "dense",
    "encode",
    "from_record_batch",
    "read_ipc",
    "to_ipc",
    "to_record_batch",
    "topk",
]
