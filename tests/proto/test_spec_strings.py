"""One reading of a spec string: configs accept and refuse what `parse_spec` does, alike."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from lyceum.compression.job_config import JobConfig
from lyceum.proto.specs import check_spec, parse_spec
from lyceum.student_client.trainer_config import DatasetConfig

GOOD = [
    "lyceum.deploy.examples:digits",
    "lyceum.deploy.examples:Digits.__getitem__",  # a dotted attribute
    'lyceum.deploy.examples:digits{"split": "val"}',  # inline JSON kwargs
    " lyceum.deploy.examples:digits ",
]
BAD = {
    "digits": "expected 'package.module:callable'",
    "lyceum.deploy.examples:": "expected 'package.module:callable'",
    ":digits": "expected 'package.module:callable'",
    "lyceum.deploy.examples: {}": "expected 'package.module:callable'",
    'lyceum.deploy.examples:digits{"split": ': "keyword arguments are not valid JSON",
    'lyceum.deploy.examples:digits{"a"}': "keyword arguments are not valid JSON",
}


def _job(spec: str) -> JobConfig:
    return JobConfig(model=spec, dataset=spec, out_dir=Path("out"))


@pytest.mark.parametrize("spec", GOOD)
def test_every_config_accepts_what_parse_spec_reads(spec: str) -> None:
    parsed = parse_spec(spec)
    assert check_spec(spec) == spec
    assert _job(spec).model_spec() == parsed
    assert DatasetConfig(train=spec).train_spec() == parsed


@pytest.mark.parametrize("spec", list(BAD))
def test_every_config_refuses_what_parse_spec_refuses_with_its_sentence(spec: str) -> None:
    with pytest.raises(ValueError) as parsed:
        parse_spec(spec)
    assert BAD[spec] in str(parsed.value)
    for build in (_job, lambda s: DatasetConfig(train=s)):
        with pytest.raises(ValidationError) as err:
            build(spec)
        assert str(parsed.value) in str(err.value)
