"""Lyceum compression: analysis, structured pruning, quantization and NAS (imports nothing of the service).

Each verb has its package (`from lyceum.compression.pruning import prune, UniformPruning`);
none is imported with this one, so importing one verb does not load the others' libraries
(torch-pruning, torchao).
"""

__all__ = [
    # one package per verb
    "pruning",
    "quantization",
    # the verbs chained from one YAML: lyceum.compression.pipeline.compress
    "pipeline",
    # what they share: measuring and training a model, the search controller, the jobs' config
    "analysis",
    "training",
    "search",
    "nas",
    "distillation",
    "job_config",
]
