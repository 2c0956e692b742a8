"""What the teacher server and the student client share: the knowledge schema, the codec,
the manifest of offline knowledge, the generated gRPC stubs (`lyceum.v1`), the wire's framing
(`wire`, `zmq_frames`) and error codes (`errors`), a shard's row addressing (`shard_rows`),
model/dataset specs, and the small modules both sides (and compression) import: config files,
progress display, CURVE keys and secret files.

Modules listed in `__all__` are public as modules (`from lyceum.proto import wire`); they are
not imported with the package, which stays lean for the code that needs only a schema.
"""

from lyceum.proto.codec import (
    KnowledgeBatch,
    concat_batches,
    decode,
    encode,
    from_record_batch,
    read_ipc,
    to_ipc,
    to_record_batch,
)
from lyceum.proto.configs import explain_validation_error, read_yaml_mapping, validate_mapping
from lyceum.proto.manifest import (
    MANIFEST_NAME,
    MANIFEST_VERSION,
    DatasetFingerprint,
    Manifest,
    ModelIdentity,
    ShardInfo,
    check_dataset,
    dataset_fingerprint,
    model_identity,
    state_dict_sha256,
    verify_dataset,
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
    # the knowledge schema: fields, their encoding, the id column, the format version
    "KnowledgeSchema",
    "FieldSpec",
    "dense",
    "topk",
    "Dense",
    "TopK",
    "SAMPLE_ID",
    "FORMAT_VERSION",
    # a knowledge batch and its bytes (the same Arrow IPC message on every wire and file)
    "KnowledgeBatch",
    "encode",
    "decode",
    "to_record_batch",
    "from_record_batch",
    "to_ipc",
    "read_ipc",
    "concat_batches",
    # offline knowledge: the manifest, and what identifies a teacher and its dataset
    "Manifest",
    "ShardInfo",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "ModelIdentity",
    "model_identity",
    "state_dict_sha256",
    "DatasetFingerprint",
    "dataset_fingerprint",
    "check_dataset",
    "verify_dataset",
    # config files: one YAML reader, one explanation of validation errors
    "read_yaml_mapping",
    "validate_mapping",
    "explain_validation_error",
    # modules, public as modules
    "codec",  # encode/decode above, IPC framing
    "schema",
    "manifest",
    "fingerprint",  # dataset fingerprints (manifest re-exports them)
    "teacher_identity",  # which teacher made the knowledge (manifest re-exports it)
    "wire",  # hand-framed Distill messages, byte-identical to protobuf's
    "zmq_frames",  # ZeroMQ message frames, both directions
    "errors",  # error codes, their names, which are retryable
    "shard_rows",  # where a shard's rows are: the offline reader's addressing
    "items",  # dataset items: the teacher's inputs (tuple or dict items), label keys
    "vocab",  # vocabulary identity of token-level knowledge; padded student vocabularies
    "sizes",  # upper bounds on a reply's bytes: requests cut so none exceeds the limit
    "specs",  # `module:callable` specs of models and datasets, checkpoints
    "configs",
    "display",  # Progress, format_bytes, plural
    "curve_keys",  # ZeroMQ CURVE keys
    "secret_files",  # token and key files
    "checksum",  # sha256 of files and buffers: dumps, shard checks, checkpoints
    "evaluation",  # top-1 accuracy, one function for trainer, compression and demo
    "generate",  # `python -m lyceum.proto.generate` (make proto): regenerates the stubs
]
