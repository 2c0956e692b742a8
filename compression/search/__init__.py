"""Search controllers shared by automatic pruning and NAS."""

from lyceum.compression.search.annealing import (
    InfeasibleSearchError,
    SAConfig,
    SAController,
    SearchResult,
)
from lyceum.compression.search.base import Objective, SearchSpace

__all__ = [
    "InfeasibleSearchError",
    "Objective",
    "SAConfig",
    "SAController",
    "SearchResult",
    "SearchSpace",
]
