"""Lyceum teacher server: model loading, batched inference, online servers and the offline dump.

The online server's names (`create_server`, `serve`, `TeacherServer`) are imported on first
use: they pull in grpcio and pyzmq, which a dump or an import for type hints does not need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lyceum.teacher_server.config import SecurityConfig, ServerConfig
from lyceum.teacher_server.dump import DumpConfig, KnowledgeWriter, dump_knowledge
from lyceum.teacher_server.engine import EngineConfig, OutputSpec, TeacherEngine

if TYPE_CHECKING:
    from lyceum.teacher_server.server import TeacherServer, create_server, serve

_LAZY = {"TeacherServer", "create_server", "serve"}

__all__ = [
    "DumpConfig",
    "EngineConfig",
    "KnowledgeWriter",
    "OutputSpec",
    "SecurityConfig",
    "ServerConfig",
    "TeacherEngine",
    "TeacherServer",
    "create_server",
    "dump_knowledge",
    "serve",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("lyceum.teacher_server.server"), name)
    raise AttributeError(f"module 'lyceum.teacher_server' has no attribute {name!r}")
