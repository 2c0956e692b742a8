"""One YAML reader and one explanation of pydantic errors: the lines a user reads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lyceum.proto.configs import explain_validation_error, read_yaml_mapping, validate_mapping


class _Term(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["soft_label", "mse"] = Field(description="loss kind")
    weight: float = Field(default=1.0, ge=0, description="weight")


class _Uniform(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["uniform"] = Field(description="tag")
    flops: float = Field(description="target")


class _Auto(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["auto"] = Field(description="tag")
    trials: int = Field(default=10, gt=0, description="trials")


class _Job(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="spec")
    terms: tuple[_Term, ...] = Field(min_length=1, description="terms")
    merge: dict[str, str | dict[str, float]] = Field(default_factory=dict, description="merge")
    strategy: Annotated[_Uniform | _Auto, Field(discriminator="kind")] = Field(
        default=_Auto(kind="auto"), description="strategy"
    )
    epochs: int = Field(gt=0, description="epochs")

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        if ":" not in value:
            raise ValueError(f"expected a 'module:callable' spec, got {value!r}")
        return value


def _good(**patch: Any) -> dict[str, Any]:
    return {"model": "pkg.mod:fn", "terms": [{"kind": "mse"}], "epochs": 2, **patch}


def _explained(raw: dict[str, Any]) -> str:
    with pytest.raises(ValueError) as err:
        validate_mapping(_Job, raw, "job.yaml", "test")
    assert not isinstance(err.value, ValidationError)
    assert isinstance(err.value.__cause__, ValidationError)  # kept for --debug
    return str(err.value)


@pytest.mark.parametrize(
    ("raw", "line"),
    [
        # A typo inside the only list item: that error alone, not also "at least 1 item".
        (
            _good(terms=[{"kind": "soft_lable"}]),
            "key 'terms.0.kind': got 'soft_lable': Input should be 'soft_label' or 'mse'",
        ),
        (
            _good(terms=[{"kind": "mse", "wieght": 2}]),
            "key 'terms.0.wieght': got 2: Extra inputs are not permitted",
        ),
        (
            _good(terms=[]),
            "key 'terms': got []: Tuple should have at least 1 item after validation, not 0",
        ),
        # The union's branches that did not apply are dropped ...
        (
            _good(merge={"logits": {"teacher": "heavy"}}),
            "key 'merge.logits.teacher': got 'heavy': Input should be a valid number, unable to "
            "parse string as a number",
        ),
        # ... and where none applied, they read as one sentence.
        (
            _good(merge={"logits": 3}),
            "key 'merge.logits': got 3: Input should be a valid string or a valid dictionary",
        ),
        # A tagged union: the path as written (no branch name), the tag's own key when it is bad.
        (
            _good(strategy={"kind": "uniform"}),
            "key 'strategy.flops': required, but not given",
        ),
        (
            _good(strategy={"kind": "magic"}),
            "key 'strategy.kind': Input tag 'magic' found using 'kind' does not match any of the "
            "expected tags: 'uniform', 'auto'",
        ),
        # A validator's own message, without pydantic's "Value error, " and without the value
        # twice; a number is shown even when the message happens to contain its digits.
        (_good(model="nocolon"), "key 'model': expected a 'module:callable' spec, got 'nocolon'"),
        (_good(epochs=0), "key 'epochs': got 0: Input should be greater than 0"),
        (
            {"model": "pkg.mod:fn", "terms": [{"kind": "mse"}]},
            "key 'epochs': required, but not given",
        ),
    ],
)
def test_one_line_per_real_problem(raw: dict[str, Any], line: str) -> None:
    assert _explained(raw) == f"job.yaml: invalid test config: {line}"


def test_several_problems_are_listed_under_one_header() -> None:
    message = _explained(_good(strategy={"kind": "uniform", "flops": 1, "ratoi": 1}, epochs="x"))
    assert message.splitlines() == [
        "job.yaml: invalid test config (2 problems):",
        "  key 'strategy.ratoi': got 1: Extra inputs are not permitted",
        "  key 'epochs': got 'x': Input should be a valid integer, unable to parse string as an "
        "integer",
    ]
    assert "errors.pydantic.dev" not in message and "validation error for" not in message


def test_options_name_fields_as_typed_and_without_input_union_names_are_dropped() -> None:
    with pytest.raises(ValidationError) as err:
        _Job.model_validate(_good(epochs=-1, merge={"logits": 3}))
    assert explain_validation_error(err.value, options={"epochs": "--epochs"}).splitlines() == [
        "invalid input (2 problems):",
        "  key 'merge.logits': got 3: Input should be a valid string or a valid dictionary",
        "  option --epochs: got -1: Input should be greater than 0",
    ]


def test_long_values_are_shortened() -> None:
    message = _explained(_good(epochs="x" * 500))
    assert "got '" + "x" * 100 in message and "x" * 130 not in message and "...:" in message


def test_yaml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("model: pkg.mod:fn\nterms: [{kind: mse}\nepochs: 2\n")
    with pytest.raises(ValueError) as err:
        read_yaml_mapping(path, "test")
    assert str(err.value).splitlines() == [
        f"{path}:3:1: not valid YAML: expected ',' or ']', but got '<scalar>' (while parsing a "
        "flow sequence that starts at line 2, column 8)",
        "    epochs: 2",
        "    ^",
    ]
    assert '"<unicode string>"' not in str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the file is empty; expected the test settings as YAML"),
        ("# only a comment\n", "the file is empty"),
        (
            "- a\n- b\n",
            "expected a mapping of test settings ('key: value' lines) at the top level, got a list",
        ),
        ("just words\n", "got a str"),
        (b"\xff\xfe\x00model: x", "not a readable YAML file"),
    ],
)
def test_yaml_that_is_not_a_mapping(tmp_path: Path, text: str | bytes, message: str) -> None:
    path = tmp_path / "job.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(ValueError, match="^" + str(path)) as err:
        read_yaml_mapping(path, "test")
    assert message in str(err.value)


def test_a_missing_file_is_an_os_error_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        read_yaml_mapping(tmp_path / "nope.yaml", "test")
    assert err.value.filename == str(tmp_path / "nope.yaml")


def test_yaml_is_data_only(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ValueError, match=r"job.yaml:1:8: not valid YAML: .*python/object/apply"):
        read_yaml_mapping(path, "test")
