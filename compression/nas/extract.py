"""A subnet out of the supernet: a plain network with sliced weights, saved without pickle.

`extract(supernet, config)` builds the subnet as `OFASpace.build_subnet` does (Light-NAS blocks
in an `nn.Sequential`: no supernet code) and copies the weights the active subnet uses into it:
the first `cin * expand` hidden channels, the depthwise kernel as the supernet computes it (crop,
and transform if any), the BN statistics of those channels. Its outputs equal the supernet's
with that subnet active.

`save_subnet` writes `model.safetensors` (format `lyceum-subnet` in its header) and
`subnet.json` (the space and the subnet config) into a directory. `SUBNET_WEIGHTS` is the
`lyceum.weights_formats` entry point of that format, so `lyceum.proto.specs.load_model(spec,
"DIR/model.safetensors")` rebuilds the subnet from the JSON beside the weights, where `spec` is
the supernet's (`lyceum.compression.nas:ofa_supernet{...}`) or the subnet's own factory
(`lyceum.compression.nas:ofa_subnet{"config": "DIR/subnet.json"}`, which builds the plain
subnet: what prune's plan applies to, so a pruned subnet rebuilds the same way).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from lyceum.compression._io import write_bytes_atomic
from lyceum.compression.nas._elastic import ElasticBlock
from lyceum.compression.nas.lightnas import InvertedResidual
from lyceum.compression.nas.ofa_space import OFASpace, OFASpaceConfig, SubnetConfig
from lyceum.compression.nas.supernet import Supernet
from lyceum.proto.specs import WEIGHTS_FILE

__all__ = [
    "SUBNET_FILE",
    "SUBNET_FORMAT",
    "SUBNET_WEIGHTS",
    "SubnetFile",
    "extract",
    "load_subnet",
    "ofa_subnet",
    "read_subnet",
    "save_subnet",
]

SUBNET_FILE = "subnet.json"
SUBNET_FORMAT = "lyceum-subnet"
"""The `format` in a subnet's weights header: its entry point in `lyceum.weights_formats`."""
_SUBNET_VERSION = 1


class SubnetFile(BaseModel):
    """What `subnet.json` holds: enough to build the plain subnet with no supernet."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = Field(default=_SUBNET_VERSION, description="File format version.")
    space: OFASpaceConfig = Field(description="The supernet's space.")
    subnet: SubnetConfig = Field(description="The subnet.")
    tokens: list[int] = Field(description="The subnet as the search engine's tokens.")


@torch.no_grad()
def _copy_bn(target: nn.BatchNorm2d, source: nn.BatchNorm2d, channels: int) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(target, name).copy_(getattr(source, name)[:channels])
    assert target.num_batches_tracked is not None and source.num_batches_tracked is not None
    target.num_batches_tracked.copy_(source.num_batches_tracked)


def _layer(body: nn.Sequential, index: int, kind: type[nn.Module]) -> Any:
    layer = body[index]
    assert isinstance(layer, kind), f"InvertedResidual body[{index}] is {type(layer).__name__}"
    return layer


@torch.no_grad()
def _copy_block(target: InvertedResidual, source: ElasticBlock, kernel: int, expand: int) -> None:
    hidden = source.cin * expand
    body = target.body
    # InvertedResidual's body: expand conv, BN, ReLU6, depthwise, BN, ReLU6, project, BN.
    _layer(body, 0, nn.Conv2d).weight.copy_(source.expand_conv.weight[:hidden])
    _copy_bn(_layer(body, 1, nn.BatchNorm2d), source.expand_bn, hidden)
    _layer(body, 3, nn.Conv2d).weight.copy_(source.depthwise_weight(kernel)[:hidden])
    _copy_bn(_layer(body, 4, nn.BatchNorm2d), source.depthwise_bn, hidden)
    _layer(body, 6, nn.Conv2d).weight.copy_(source.project.weight[:, :hidden])
    _copy_bn(_layer(body, 7, nn.BatchNorm2d), source.project_bn, source.cout)


def extract(supernet: Supernet, config: SubnetConfig | None = None) -> nn.Sequential:
    """The subnet `config` (default: the active one) as a plain network with its weights."""
    space = supernet.space
    config = space.check(config or supernet.active)
    model = space.build_subnet(config)
    layers = list(model.children())
    blocks = config.active_blocks()
    fixed = [(layers[0], supernet.stem), (layers[1], supernet.first)]
    fixed += [(layers[-2], supernet.last), (layers[-1], supernet.head)]
    for target, source in fixed:
        target.load_state_dict(source.state_dict())
    for layer, (s, b, kernel, expand) in zip(layers[2:-2], blocks, strict=True):
        assert isinstance(layer, InvertedResidual)
        _copy_block(layer, supernet.blocks[s][b], kernel, expand)
    return model.train(supernet.training)


def save_subnet(
    model: nn.Module, space: OFASpace, config: SubnetConfig, directory: str | Path
) -> Path:
    """Write the extracted `model` of subnet `config` as `model.safetensors` + `subnet.json`."""
    from safetensors.torch import save

    out = Path(directory)
    record = SubnetFile(space=space.config, subnet=config, tokens=space.tokens(config))
    write_bytes_atomic(out / SUBNET_FILE, record.model_dump_json(indent=1).encode())
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    write_bytes_atomic(out / WEIGHTS_FILE, save(state, metadata={"format": SUBNET_FORMAT}))
    return out


def read_subnet(path: str | Path) -> SubnetFile:
    """Read `subnet.json`, refusing an unknown format version."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a JSON subnet file ({exc}); re-extract the subnet") from exc
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != _SUBNET_VERSION:
        raise ValueError(
            f"{path}: subnet format_version {version!r} is not supported (this reader handles "
            f"{_SUBNET_VERSION}); re-extract the subnet with this version of lyceum"
        )
    return SubnetFile.model_validate(raw)


def _subnet_file_beside(weights: Path) -> Path:
    found = weights.parent / SUBNET_FILE
    if not found.is_file():
        raise ValueError(
            f"checkpoint {str(weights)!r} holds a once-for-all subnet's weights, and "
            f"{SUBNET_FILE}, which says which subnet, is not beside it in "
            f"{str(weights.parent)!r}: copy it from the directory `extract` wrote"
        )
    return found


def load_subnet(path: str | Path) -> nn.Sequential:
    """The subnet saved in directory `path` (or its `model.safetensors`), in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if not weights.is_file():
        raise ValueError(f"subnet {str(path)!r}: {str(weights)!r} does not exist")
    record = read_subnet(_subnet_file_beside(weights))
    model = OFASpace(record.space).build_subnet(record.subnet)
    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights}: weights do not fit the subnet {SUBNET_FILE} describes (missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}); is {SUBNET_FILE} the one written "
            f"with these weights?"
        )
    return model.eval()


def ofa_subnet(config: str) -> nn.Sequential:
    """A fresh plain subnet, as a model spec: `lyceum.compression.nas:ofa_subnet{"config":
    "DIR/subnet.json"}` (what prune's plan applies to, as it does to any factory's model)."""
    record = read_subnet(config)
    return OFASpace(record.space).build_subnet(record.subnet)


class SubnetWeights:
    """`lyceum.proto.specs.WeightsFormat` of extracted subnets: `subnet.json` beside the weights."""

    def load(self, model: nn.Module, weights: Path) -> nn.Module:
        record = read_subnet(_subnet_file_beside(weights))
        if isinstance(model, Supernet):
            if model.space.config != record.space:
                raise ValueError(
                    f"checkpoint {str(weights)!r} is a subnet of another supernet than the "
                    f"model spec builds: give the spec the subnet's space "
                    f"{record.space.model_dump_json()}"
                )
        else:
            expected = OFASpace(record.space).build_subnet(record.subnet).state_dict()
            got = model.state_dict()
            if {k: v.shape for k, v in got.items()} != {k: v.shape for k, v in expected.items()}:
                raise ValueError(
                    f"checkpoint {str(weights)!r} holds a once-for-all subnet, and the model "
                    f"spec builds a {type(model).__name__} of another shape: give the "
                    f"supernet's spec (lyceum.compression.nas:ofa_supernet{{...}}) or the "
                    f'subnet\'s (lyceum.compression.nas:ofa_subnet{{"config": '
                    f'"{weights.parent / SUBNET_FILE}"}})'
                )
        # The mode the model came in, as a plain load_state_dict leaves it (the trainer
        # fine-tunes the model it gets without calling train()).
        return load_subnet(weights).train(model.training)

    def companions(self, weights: Path) -> list[Path]:
        return [_subnet_file_beside(weights)]


SUBNET_WEIGHTS = SubnetWeights()
"""What the `lyceum-subnet` entry point names (pyproject.toml, `lyceum.weights_formats`)."""
