"""One search engine for automatic pruning and NAS: simulated annealing (or regularized
evolution, `SAConfig(method="evolution")`) on Optuna studies.

result = run_search(space, objective, SAConfig(max_iterations=50, seed=0),
                    study=StudyConfig(storage="search.db", study="nas"))

Any number of workers (processes, machines) run `run_search` against one storage and extend one
annealing chain (or one evolving population), rebuilt from the storage at every draw (each
worker reads only the trials new or unfinished since its last read, `StudyTrials`); a search
resumes from the storage alone.
A trial's candidate is one system attribute (`DRAW_ATTR`; `trial_tokens` reads it).
"""

from lyceum.compression.search.base import CanonicalSpace, Objective, SearchSpace, canonical_tokens
from lyceum.compression.search.chain import SAChain
from lyceum.compression.search.config import SAConfig, StudyConfig
from lyceum.compression.search.evolution import EvolutionSampler
from lyceum.compression.search.sampler import (
    FeasibleSampler,
    InfeasibleSearchError,
    ProposingSampler,
    SASampler,
)
from lyceum.compression.search.storage import (
    STALE_ATTR,
    Heartbeat,
    fail_stale_trials,
    open_storage,
)
from lyceum.compression.search.study import (
    SearchResult,
    open_study,
    run_search,
    saved_sa_config,
    search_result,
)
from lyceum.compression.search.trials import (
    CACHED_ATTR,
    DRAW_ATTR,
    DUPLICATE_ATTR,
    ERROR_ATTR,
    SURPLUS_ATTR,
    StudyTrials,
    draw_attr,
    param_names,
    trial_tokens,
)

__all__ = [
    # the loop and its settings: run_search(space, objective, SAConfig(...), study=StudyConfig(...))
    "run_search",
    "SAConfig",
    "StudyConfig",
    "SearchResult",
    "InfeasibleSearchError",
    # what a search runs on: the protocols a space and an objective implement
    "SearchSpace",
    "CanonicalSpace",
    "canonical_tokens",
    "Objective",
    # building blocks: the samplers, the chain they replay, the study and its storage
    "SASampler",
    "EvolutionSampler",
    "ProposingSampler",
    "FeasibleSampler",
    "SAChain",
    "open_study",
    "StudyTrials",
    "search_result",
    "saved_sa_config",
    "open_storage",
    "fail_stale_trials",
    "Heartbeat",
    "param_names",
    "trial_tokens",
    "draw_attr",
    "DRAW_ATTR",
    "CACHED_ATTR",
    "DUPLICATE_ATTR",
    "ERROR_ATTR",
    "STALE_ATTR",
    "SURPLUS_ATTR",
]
