"""Settings of a search: the annealing schedule and budget, and where the study is stored."""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["SAConfig", "StudyConfig"]


class SAConfig(BaseModel):
    """Settings of the simulated-annealing search (PaddleSlim's SAController's, made relative)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    init_temperature: float = Field(
        default=1.0,
        gt=0,
        description="Starting temperature, in units of the running reward spread (mean |delta|).",
    )
    reduce_rate: float = Field(
        default=0.9,
        gt=0,
        lt=1,
        description="Temperature multiplier per decided move (finished trial after the first).",
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
    seed: int = Field(default=0, description="Seed of every draw of the chain.")


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
