"""The teacher of a distilled NAS reward: its knowledge of the whole training set, fetched once.

An offline dump is read by id (`OfflineKnowledge`, its dataset fingerprint checked against the
training split); online endpoints are asked in chunks (`OnlineTeacher.request`, with failover
between replicas). The loss is `lyceum.student_client.losses.soft_label_kd` with the field's
meaning and the temperature it was produced at, from the teacher's schema.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, cast

import torch
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from lyceum.compression.nas import NASDistillation, TeacherKnowledge
    from lyceum.proto.schema import KnowledgeSchema
    from lyceum.student_client.losses import TeacherMeaning

_CHUNK = 256


def teacher_knowledge(
    config: NASDistillation, train: Dataset, *, key: str = "distill"
) -> TeacherKnowledge:
    """What `TrainingReward(teacher=...)` needs: the teacher's `config.field` for every
    sample of `train` (row i = sample i) and the soft-label loss that learns it. `key` is the
    config's name for `config` in error messages (`distill` in Light-NAS, `teacher` in OFA)."""
    from lyceum.compression.nas import TeacherKnowledge
    from lyceum.student_client.losses import soft_label_kd

    size = len(train)  # type: ignore[arg-type]
    ids = torch.arange(size, dtype=torch.int64)
    if config.knowledge_dir is not None:
        from lyceum.student_client import OfflineKnowledge

        knowledge = OfflineKnowledge(config.knowledge_dir, train)
        try:
            schema = knowledge.schema
            _check_field(schema, config, f"dump {config.knowledge_dir!r}", key)
            outputs = knowledge.get(ids).tensors[config.field]
        finally:
            knowledge.close()
    else:
        from lyceum.student_client import OnlineTeacher

        assert config.endpoints is not None  # NASDistillation allows one of the two
        teacher = OnlineTeacher(config.endpoints, mode=config.mode, dataset=train)  # type: ignore[arg-type]
        try:
            schema = teacher.describe().schema
            _check_field(schema, config, f"teacher {config.endpoints}", key)
            chunks = []
            for start in range(0, size, _CHUNK):
                chunk = ids[start : start + _CHUNK]
                inputs = None
                if config.mode == "query":
                    inputs = torch.stack([train[int(i)][0] for i in chunk])
                batch = teacher.request(chunk, inputs)
                order = torch.argsort(batch.sample_ids)
                chunks.append(batch.tensors[config.field][order])
            outputs = torch.cat(chunks)
        finally:
            teacher.close()
    spec = schema.field(config.field)
    # _check_field refused "features": what is left is one of soft_label_kd's meanings.
    meaning = cast("TeacherMeaning", spec.meaning)
    loss = partial(
        soft_label_kd,
        meaning=meaning,
        temperature=config.temperature,
        teacher_temperature=spec.temperature,
    )
    return TeacherKnowledge(outputs=outputs.float(), loss=loss, alpha=config.alpha)


def _check_field(schema: KnowledgeSchema, config: NASDistillation, where: str, key: str) -> None:
    names = [f.name for f in schema.fields]
    if config.field not in names:
        raise ValueError(
            f"{key}.field {config.field!r}: {where} has no such field (it has {names}); "
            f"set {key}.field to one of them"
        )
    spec = schema.field(config.field)
    if spec.encoding.kind != "dense" or spec.meaning == "features":
        raise ValueError(
            f"{key}.field {config.field!r} of {where} is {spec.encoding.kind} "
            f"{spec.meaning}: the NAS reward distils dense logits, log-probs or probs "
            "(soft-label KD); dump or serve the teacher without --topk, and name its logits"
        )
