"""Lyceum teacher server: model loading, batched inference, online servers and the offline dump.

The online server's names (`create_server`, `serve`, `TeacherServer`) are imported on first
use: they pull in grpcio and pyzmq, which a dump or an import for type hints does not need.
The modules listed last are not imported with the package either.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lyceum.teacher_server.config import SecurityConfig, ServerConfig
from lyceum.teacher_server.dump import DumpConfig, KnowledgeWriter, dump_knowledge, merge_knowledge
from lyceum.teacher_server.engine import EngineConfig, OutputSpec, TeacherEngine

if TYPE_CHECKING:
    from lyceum.teacher_server.server import TeacherServer, create_server, serve

_LAZY = {"TeacherServer", "create_server", "serve"}

__all__ = [
    # serving online: create_server(config, engines, dataset) -> (server, ports), or serve()
    "create_server",
    "serve",
    "TeacherServer",
    "ServerConfig",
    "SecurityConfig",
    # dumping offline: dump_knowledge(engines, dataset, out_dir, config, identity); ranks of
    # one dump (DumpConfig.rank/world_size) complete it by themselves, or merge_knowledge(dir)
    "dump_knowledge",
    "DumpConfig",
    "merge_knowledge",
    "KnowledgeWriter",
    # the engine both run: a model's forward as knowledge fields
    "TeacherEngine",
    "EngineConfig",
    "OutputSpec",
    # the server's parts, as modules (for its tests and tools)
    "batcher",
    "errors",
    "metrics",
    "security",
    "transport",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("lyceum.teacher_server.server"), name)
    raise AttributeError(f"module 'lyceum.teacher_server' has no attribute {name!r}")
