"""Lyceum deploy layer: the `lyceum` CLI, the local launcher, example models and data.

Modules, none imported with the package (the CLI loads each command's libraries only when it
runs).
"""

__all__ = [
    # the `lyceum` command (`python -m lyceum.deploy.cli`), `lyceum demo` and `demo --lm`
    "cli",
    "demo",
    "demo_lm",
    # example models and datasets, named by specs (`lyceum.deploy.examples:digits`)
    "examples",
    # local text for language models: the stdlib's sources and a BPE trained on them
    "stdlib_text",
    # tiny versions of the architectures people prune: CNNs, transformers (specs too)
    "architectures",
    "vision_transformers",
    # starting teachers and students as local processes
    "launcher",
]
