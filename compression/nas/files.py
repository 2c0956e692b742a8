"""A found architecture as files: `tokens.json` (space spec + tokens) beside `model.safetensors`.

A NAS network is not the architecture any fixed factory builds: its layers follow its tokens.
So, as pruned models do with their plan, the weights file names its format in its header
(`format: lyceum-nas`) and `NAS_WEIGHTS` is registered under that name in the
`lyceum.weights_formats` entry points: `lyceum.proto.specs.load_model("lyceum.compression.nas:
nas_model", "runs/nas/model.safetensors")`, and with it every `--checkpoint` / `checkpoint:` of
the commands given `--model lyceum.compression.nas:nas_model`, rebuilds the network from the
space and tokens in `tokens.json` (JSON: nothing unpickled) and loads the weights strictly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from lyceum.compression._io import write_bytes_atomic
from lyceum.proto.specs import WEIGHTS_FILE, check_spec, parse_spec

__all__ = [
    "NAS_FORMAT",
    "NAS_WEIGHTS",
    "TOKENS_FILE",
    "Architecture",
    "NASNetwork",
    "load_architecture",
    "nas_model",
    "read_architecture",
    "save_architecture",
]

TOKENS_FILE = "tokens.json"
NAS_FORMAT = "lyceum-nas"
"""The `format` in a NAS network's weights header: its entry point in `lyceum.weights_formats`."""
_FORMAT_VERSION = 1
_DEFAULT_SPACE = "lyceum.compression.nas:lightnas_space"


class Architecture(BaseModel):
    """What rebuilds a candidate network: its space (a spec and its arguments) and tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = Field(default=_FORMAT_VERSION, description="Layout of this file.")
    space: str = Field(default=_DEFAULT_SPACE, description="The space, a `module:callable` spec.")
    space_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the space's factory."
    )
    tokens: list[int] = Field(description="The candidate's tokens in the space.")

    def build(self) -> NASNetwork:
        """The network (freshly initialised), tokens checked against the space's ranges."""
        from lyceum.compression.search.chain import check_tokens

        check_spec(self.space)
        space = parse_spec(self.space, self.space_kwargs).build("space spec")
        tokens = check_tokens(self.tokens, space.range_table(), f"architecture in {self.space}")
        return NASNetwork(space.build(tokens), self)


class NASNetwork(nn.Module):
    """A space's network with the architecture it was built from (what `tokens.json` holds)."""

    def __init__(
        self,
        network: nn.Module,
        architecture: Architecture,
        *,
        requested: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.network = network
        self.architecture = architecture
        # What `nas_model(...)` was asked for (all of the architecture unless given fewer
        # arguments): a checkpoint must agree with these, and supplies the rest.
        self.requested = architecture.model_dump() if requested is None else requested

    def forward(self, x: Any) -> Any:
        return self.network(x)


def nas_model(
    tokens: list[int] | None = None,
    space: str | None = None,
    space_kwargs: dict[str, Any] | None = None,
) -> NASNetwork:
    """Model factory for specs (`lyceum.compression.nas:nas_model`): the candidate `tokens` of
    `space` (default Light-NAS). Given no arguments, as the model of a `lyceum-nas` checkpoint,
    it builds the space's initial network, which the checkpoint's own architecture (its
    `tokens.json`) replaces; arguments given must agree with that file."""
    requested: dict[str, Any] = {}
    if space is not None:
        requested["space"] = space
        requested["space_kwargs"] = space_kwargs or {}
    if tokens is not None:
        requested["tokens"] = list(tokens)
    space = space or _DEFAULT_SPACE
    if tokens is None:
        check_spec(space)
        tokens = list(parse_spec(space, space_kwargs or {}).build("space spec").init_tokens())
    architecture = Architecture(space=space, space_kwargs=space_kwargs or {}, tokens=tokens)
    network = architecture.build()
    network.requested = requested
    return network


def save_architecture(model: NASNetwork, directory: str | Path) -> Path:
    """Write `tokens.json` and `model.safetensors` (header `format: lyceum-nas`) into
    `directory`, atomically and with the umask's mode; returns the weights file."""
    from safetensors.torch import save

    out = Path(directory)
    write_bytes_atomic(out / TOKENS_FILE, model.architecture.model_dump_json(indent=1).encode())
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    write_bytes_atomic(out / WEIGHTS_FILE, save(state, metadata={"format": NAS_FORMAT}))
    return out / WEIGHTS_FILE


def read_architecture(path: str | Path) -> Architecture:
    """Read a `tokens.json`, refusing unknown format versions."""
    import json

    raw = json.loads(Path(path).read_text())
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != _FORMAT_VERSION:
        raise ValueError(
            f"{path}: architecture format_version {version!r} is not supported (this reader "
            f"handles {_FORMAT_VERSION}); write it again with `lyceum nas train`"
        )
    return Architecture.model_validate(raw)


def _weights_and_tokens(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if not weights.is_file():
        raise ValueError(f"NAS network {str(path)!r}: {str(weights)!r} does not exist")
    tokens = weights.parent / TOKENS_FILE
    if not tokens.is_file():
        raise ValueError(
            f"checkpoint {str(weights)!r} holds a NAS network, and the file that names its "
            f"architecture, {TOKENS_FILE}, is not beside it in {str(weights.parent)!r}: copy "
            f"{TOKENS_FILE} from the `lyceum nas train` out_dir that wrote these weights"
        )
    return weights, tokens


def load_architecture(path: str | Path) -> NASNetwork:
    """The network saved in `path` (the directory `save_architecture` wrote, or its weights
    file): rebuilt from `tokens.json`, weights loaded strictly, in eval mode."""
    from safetensors.torch import load_file

    weights, tokens = _weights_and_tokens(path)
    model = read_architecture(tokens).build()
    try:
        model.load_state_dict(load_file(str(weights)))
    except RuntimeError as exc:
        raise ValueError(
            f"{weights}: weights do not fit the network {tokens} describes ({exc}); is "
            f"{TOKENS_FILE} the one written with these weights?"
        ) from exc
    return model.eval()


class NASWeights:
    """`lyceum.proto.specs.WeightsFormat` of NAS networks: the architecture beside the weights."""

    def load(self, model: nn.Module, weights: Path) -> nn.Module:
        if not isinstance(model, NASNetwork):
            raise ValueError(
                f"checkpoint {str(weights)!r} holds a NAS network (its architecture in "
                f"{TOKENS_FILE} beside it), but the model spec built a "
                f"{type(model).__name__}: give the model as lyceum.compression.nas:nas_model "
                f"(no arguments needed)"
            )
        loaded = load_architecture(weights)
        theirs = loaded.architecture.model_dump()
        differ = {k: v for k, v in model.requested.items() if theirs.get(k) != v}
        if differ:
            saved = {k: theirs[k] for k in differ}
            raise ValueError(
                f"checkpoint {str(weights)!r} is the architecture {saved} and the model spec "
                f"asked for {differ}: give nas_model no arguments (the file names its "
                f"architecture) or the same ones"
            )
        # In the mode it came in, as a plain load_state_dict leaves it (the trainer fine-tunes).
        return loaded.train(model.training)

    def companions(self, weights: Path) -> list[Path]:
        return [_weights_and_tokens(weights)[1]]


NAS_WEIGHTS = NASWeights()
"""What the `lyceum-nas` entry point names (pyproject.toml, `lyceum.weights_formats`)."""
