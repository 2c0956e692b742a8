"""Settings of a search: the annealing schedule and budget, and where the study is stored."""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["SAConfig", "StudyConfig"]


# Which settings each method's draws depend on: what a study saves, and checks on resume.
_EVOLUTION_SETTINGS = {"method", "seed", "population", "tournament", "max_resample"}
_EVOLUTION_ONLY = {"population", "tournament"}


class SAConfig(BaseModel):
    """Settings of the search: simulated annealing (PaddleSlim's SAController's, made
    relative), by default, or regularized evolution (`method: evolution`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["annealing", "evolution"] = Field(
        default="annealing",
        description="annealing: one chain of one-token moves (PaddleSlim's Light-NAS). "
        "evolution: regularized (aging) evolution, once-for-all's search made asynchronous: "
        "each child is a one-token mutation of the best of `tournament` members drawn from "
        "the `population` latest completed trials.",
    )

    init_temperature: float = Field(
        default=1.0,
        gt=0,
        description="annealing: starting temperature, in units of the running reward spread "
        "(mean |delta|).",
    )
    reduce_rate: float = Field(
        default=0.9,
        gt=0,
        lt=1,
        description="annealing: temperature multiplier per decided move (finished trial after "
        "the warm-up but the first).",
    )
    warmup: int = Field(
        default=0,
        ge=0,
        description="annealing: uniform random candidates (feasible, untaken) evaluated after "
        "the initial one before annealing starts, from the best of them (max_iterations or "
        "more: a random search). 0: PaddleSlim's chain, straight from the initial tokens; a "
        "start at a poor point or at the budget's edge (most neighbours infeasible) can hold a "
        "short chain there.",
    )
    max_iterations: int = Field(
        default=100,
        ge=0,
        description="Candidates evaluated after the initial tokens: the study stops at "
        "max_iterations + 1 completed trials, whatever the number of workers.",
    )
    max_resample: int = Field(
        default=300,
        ge=1,
        description="Draws allowed to find a feasible (budget-meeting) candidate for one trial "
        "before the search stops with an error.",
    )
    population: int = Field(
        default=16,
        ge=2,
        description="evolution: members of the population, the latest completed trials; the "
        "first `population` trials (the initial one, then uniform random draws) found it.",
    )
    tournament: int = Field(
        default=4,
        ge=1,
        description="evolution: members drawn for each child, the best of them its parent "
        "(larger: greedier).",
    )
    seed: int = Field(default=0, description="Seed of every draw of the chain.")

    @model_validator(mode="after")
    def _tournament_fits(self) -> Self:
        if self.method == "evolution" and self.tournament > self.population:
            raise ValueError(
                f"SAConfig: tournament {self.tournament} exceeds population {self.population}; "
                "draw at most the whole population"
            )
        return self

    def study_settings(self) -> dict[str, Any]:
        """The settings the search's draws depend on: saved with its study, checked on resume
        (a study annealed before `method` existed saved none: it is an annealing one)."""
        if self.method == "evolution":
            return self.model_dump(include=_EVOLUTION_SETTINGS)
        return self.model_dump(exclude={"max_iterations", *_EVOLUTION_ONLY})


class StudyConfig(BaseModel):
    """Where a search lives: an Optuna study that any number of workers share and resume."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    storage: str | None = Field(
        default=None,
        description="A file path (an embedded SQLite database, the default for one machine), "
        "'journal:PATH' or a path ending in .journal (Optuna's journal file, for a shared file "
        "system), or any SQLAlchemy URL (postgresql://user@host/db for a cluster). None keeps "
        "the study in memory: one worker, no resume.",
    )
    study: str = Field(default="search", min_length=1, description="Name of the study.")
    heartbeat_interval: float = Field(
        default=5.0, gt=0, description="Seconds between a running trial's heartbeats."
    )
    grace_period: float = Field(
        default=60.0,
        gt=0,
        description="Seconds without a heartbeat after which a running trial counts as dead: "
        "it is failed and its candidate handed out again. Worker clocks must agree (NTP).",
    )

    @model_validator(mode="after")
    def _grace_covers_beats(self) -> Self:
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(
                f"StudyConfig: grace_period {self.grace_period} s must exceed heartbeat_interval "
                f"{self.heartbeat_interval} s, or live trials would be failed between two beats"
            )
        return self
