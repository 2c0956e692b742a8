"""The search loop: workers sharing one Optuna study, each trial kept alive by a heartbeat.

`run_search` is one worker. Start it in as many processes, on as many machines, as wanted,
against one storage: together they finish `max_iterations + 1` completed trials. Every worker,
before each trial:

1. fails the running trials of dead workers (no heartbeat for `grace_period`);
2. hands out again the candidate of a failed trial that has no live or completed twin (a dead
   worker's, an interrupted one's), before any new candidate: no trial is lost;
3. stops when the study has its completed trials, and waits while the rest are running
   elsewhere (one of them may still die and need a retry);
4. after drawing, looks for a twin: a candidate another trial completed is not trained again
   (its reward is copied into this trial, `CACHED_ATTR`), and one a lower-numbered trial is
   training now is left to it (this trial fails as `DUPLICATE_ATTR`);
5. fails its trial as `SURPLUS_ATTR` when the lower-numbered trials completed or live already
   make the study's count (two workers that finished together and both saw one missing).

A trial whose objective raised is failed with `ERROR_ATTR` and the error propagates: a bug or a
bad input does not get retried for ever.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from pydantic import BaseModel, ConfigDict, Field

from lyceum.compression.search.base import Objective, SearchSpace
from lyceum.compression.search.chain import check_tokens
from lyceum.compression.search.config import SAConfig, StudyConfig
from lyceum.compression.search.sampler import (
    DRAW_ATTR,
    FeasibleSampler,
    SASampler,
    draw_attr,
    param_names,
    trial_tokens,
)
from lyceum.compression.search.storage import Heartbeat, fail_stale_trials, open_storage
from lyceum.proto.display import Progress

__all__ = [
    "CACHED_ATTR",
    "DUPLICATE_ATTR",
    "ERROR_ATTR",
    "SURPLUS_ATTR",
    "SearchResult",
    "open_study",
    "run_search",
    "saved_sa_config",
    "search_result",
]

_log = logging.getLogger("lyceum.search")

CACHED_ATTR = "lyceum:cached_from"
DUPLICATE_ATTR = "lyceum:duplicate_of"
SURPLUS_ATTR = "lyceum:surplus"
ERROR_ATTR = "lyceum:error"
_TABLE_ATTR = "lyceum:range_table"
_CHAIN_ATTR = "lyceum:chain"

_LIVE = (TrialState.RUNNING, TrialState.WAITING)


class SearchResult(BaseModel):
    """Outcome of a search: the best tokens, their reward and every completed trial."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    best_tokens: list[int] = Field(description="Tokens with the highest reward seen.")
    best_reward: float = Field(description="Reward of `best_tokens`.")
    history: list[dict[str, Any]] = Field(
        description="One entry per completed trial, in number order: number, tokens, reward, "
        "accepted (by the SA chain; None for other samplers), redraws, cached_from, user_attrs."
    )
    failed: int = Field(default=0, description="Trials failed (dead workers, duplicates).")

    @property
    def redraws(self) -> int:
        """Infeasible candidates drawn and skipped before training, over the whole search."""
        return sum(int(h["redraws"] or 0) for h in self.history)


def open_study(
    study: StudyConfig, sampler: optuna.samplers.BaseSampler | None = None
) -> optuna.Study:
    """Create the study, or load it when it exists (any worker may be first)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        storage=open_storage(study.storage),
        sampler=sampler,
        study_name=study.study,
        direction="maximize",
        load_if_exists=True,
    )


def saved_sa_config(study: optuna.Study) -> SAConfig | None:
    """The annealing settings a study was searched with (what replays its chain), or None for
    a study of another sampler or none yet."""
    saved = study.user_attrs.get(_CHAIN_ATTR)
    if not isinstance(saved, dict) or "sampler" in saved:
        return None
    return SAConfig.model_validate(saved)


def _check_study(study: optuna.Study, table: list[int], chain: dict[str, Any]) -> None:
    """A study resumes only with the space and chain settings it was started with."""
    for key, mine in ((_TABLE_ATTR, table), (_CHAIN_ATTR, chain)):
        saved = study.user_attrs.get(key)
        if saved is None:
            study.set_user_attr(key, mine)
        elif saved != mine:
            raise ValueError(
                f"study {study.study_name!r}: saved {key.removeprefix('lyceum:')} {saved} "
                f"differs from this search's {mine}; use a new study name or the same settings "
                "to resume"
            )


def _orphan(trials: Sequence[FrozenTrial], table: list[int]) -> list[int] | None:
    """Tokens of the lowest failed trial that should have finished and has no twin."""
    covered = {
        tuple(tokens)
        for t in trials
        if (t.state == TrialState.COMPLETE or t.state in _LIVE)
        and (tokens := trial_tokens(t, table)) is not None
    }
    for t in trials:
        if t.state != TrialState.FAIL or ERROR_ATTR in t.system_attrs:
            continue
        if DUPLICATE_ATTR in t.system_attrs or SURPLUS_ATTR in t.system_attrs:
            continue
        tokens = trial_tokens(t, table)
        if tokens is not None and tuple(tokens) not in covered:
            return tokens
    return None


def _twin(
    trials: Sequence[FrozenTrial], me: int, tokens: list[int], table: list[int]
) -> FrozenTrial | None:
    """A completed trial of the same tokens, else a lower-numbered running one."""
    running = None
    for t in trials:
        if t.number == me or trial_tokens(t, table) != tokens:
            continue
        if t.state == TrialState.COMPLETE:
            return t
        if t.state == TrialState.RUNNING and t.number < me and running is None:
            running = t
    return running


def run_search(
    space: SearchSpace,
    objective: Objective,
    config: SAConfig | None = None,
    *,
    study: StudyConfig | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
    init_tokens: Sequence[int] | None = None,
    progress: bool = True,
    worker: str = "search",
    on_trial: Callable[[dict[str, Any]], None] | None = None,
) -> SearchResult:
    """Run one worker of the search until the study has `max_iterations + 1` completed trials.

    `sampler`: another Optuna sampler (random, TPE) instead of simulated annealing; it is
    wrapped in `FeasibleSampler`, so it too never hands out a candidate over budget.
    `on_trial(entry)` is called after each trial this worker completes (the CLI's summary
    line). `progress` counts the study's completed trials, all workers' included.
    """
    config = config or SAConfig()
    study_config = study or StudyConfig()
    table = list(space.range_table())
    if init_tokens is not None:
        init_tokens = check_tokens(init_tokens, table, "init_tokens")
    if sampler is None:
        chosen: SASampler | FeasibleSampler = SASampler(space, config, init_tokens=init_tokens)
        chain = config.model_dump(exclude={"max_iterations"})
    else:
        chosen = FeasibleSampler(sampler, space, config.max_resample, config.seed)
        chain = {"sampler": type(sampler).__name__, "seed": config.seed}
    opt = open_study(study_config, chosen)
    _check_study(opt, table, chain)
    target = config.max_iterations + 1
    names = param_names(table)
    done = _completed(opt)
    poll = min(study_config.heartbeat_interval, 1.0)
    with Progress(
        total=target, desc=worker, unit="trial", initial=min(done, target), enabled=progress
    ) as bar:
        while True:
            # One listing of the trials per trial: the storage re-reads only the trials that
            # were unfinished or new at its previous listing.
            trials = opt.get_trials(deepcopy=False)
            if fail_stale_trials(opt, study_config.grace_period, trials):
                trials = opt.get_trials(deepcopy=False)
            done = sum(t.state == TrialState.COMPLETE for t in trials)
            if done > bar.n:
                bar.update(min(done, target) - bar.n)
            if done >= target:
                break
            orphan = _orphan(trials, table)
            if orphan is not None:
                opt.add_trial(
                    optuna.trial.create_trial(
                        state=TrialState.WAITING, system_attrs={DRAW_ATTR: draw_attr(orphan, 0)}
                    )
                )
            elif done + sum(t.state in _LIVE for t in trials) >= target:
                time.sleep(poll)  # others are on the last trials; one may die and need a retry
                continue
            values = [t.value for t in trials if t.value is not None]
            best = max(values) if values else None
            chosen.prefetch(trials)  # the draw replays this listing: one listing less
            told = _one_trial(opt, objective, table, names, study_config, best, target)
            if told is not None:
                if on_trial is not None:
                    on_trial(told[0])
                bar.update(0, best=f"{told[1]:.4f}")
    result = search_result(opt, table, config if sampler is None else None, init_tokens)
    return result


def _completed(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def _one_trial(
    study: optuna.Study,
    objective: Objective,
    table: list[int],
    names: list[str],
    config: StudyConfig,
    best: float | None,
    target: int,
) -> tuple[dict[str, Any], float] | None:
    """Ask, evaluate (or copy a twin's reward) and tell one trial: its history entry and the
    study's best reward (`best` before this trial, or this one's); None for a duplicate or a
    surplus trial (the study has `target` trials completed or under way before it)."""
    trial = study.ask()
    storage, trial_id = study._storage, trial._trial_id
    try:
        with Heartbeat(storage, trial_id, config.heartbeat_interval):
            # The sampler draws here, and writes the candidate once (`DRAW_ATTR`).
            tokens = [int(trial.relative_params[n]) for n in names]
            trials = study.get_trials(deepcopy=False)
            ahead = sum(
                t.number < trial.number and (t.state == TrialState.COMPLETE or t.state in _LIVE)
                for t in trials
            )
            if ahead >= target:
                storage.set_trial_system_attr(trial_id, SURPLUS_ATTR, ahead)
                study.tell(trial, state=TrialState.FAIL)
                return None
            twin = _twin(trials, trial.number, tokens, table)
            if twin is not None and twin.state == TrialState.RUNNING:
                storage.set_trial_system_attr(trial_id, DUPLICATE_ATTR, twin.number)
                study.tell(trial, state=TrialState.FAIL)
                return None
            if twin is not None:
                assert twin.value is not None  # a completed single-objective trial
                storage.set_trial_system_attr(trial_id, CACHED_ATTR, twin.number)
                reward = twin.value
            else:
                reward = float(objective(tokens))
                if not math.isfinite(reward):
                    raise ValueError(f"search: reward must be finite, got {reward} for {tokens}")
    except Exception as exc:
        storage.set_trial_system_attr(trial_id, ERROR_ATTR, f"{type(exc).__name__}: {exc}")
        study.tell(trial, state=TrialState.FAIL)
        raise
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM): failed, and its candidate handed out again on resume.
        study.tell(trial, state=TrialState.FAIL)
        raise
    # This trial as the twin search listed it (with its draw): Optuna's `tell` would re-read
    # it first, some 12 queries on a relational storage.
    mine = next(t for t in reversed(trials) if t.number == trial.number)
    _complete(study, mine, reward)
    cached_from = None if twin is None else twin.number
    entry = _entry(mine, table, None) | {"reward": reward, "cached_from": cached_from}
    best = reward if best is None else max(best, reward)
    _log.info(
        "trial %d: reward %.4f%s, tokens %s, %d redraws; best %.4f",
        trial.number,
        reward,
        f" (copied from trial {twin.number})" if twin is not None else "",
        ",".join(map(str, tokens)),
        entry["redraws"],
        best,
    )
    return entry, best


def _complete(study: optuna.Study, trial: FrozenTrial, reward: float) -> None:
    """`study.tell(trial, reward)` for the running `trial` just listed: what Optuna's tell does
    for a finite single value (the sampler's `after_trial`, then the state and value)."""
    try:
        study.sampler.after_trial(study, trial, TrialState.COMPLETE, [reward])
    finally:
        study._storage.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, [reward])


def _entry(trial: FrozenTrial, table: list[int], accepted: bool | None) -> dict[str, Any]:
    return {
        "number": trial.number,
        "tokens": trial_tokens(trial, table),
        "reward": trial.value,
        "accepted": accepted,
        "redraws": int(trial.system_attrs.get(DRAW_ATTR, {}).get("redraws", 0)),
        "cached_from": trial.system_attrs.get(CACHED_ATTR),
        "user_attrs": dict(trial.user_attrs),
    }


def search_result(
    study: optuna.Study,
    table: Sequence[int],
    config: SAConfig | None = None,
    init_tokens: Sequence[int] | None = None,
) -> SearchResult:
    """The result read back from `study`; with `config`, each trial's SA acceptance too."""
    table = list(table)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if not complete:
        raise ValueError(f"study {study.study_name!r} has no completed trial yet")
    chain = None
    if config is not None:
        from lyceum.compression.search.chain import SAChain

        start = trial_tokens(complete[0], table) if init_tokens is None else list(init_tokens)
        chain = SAChain(
            table,
            start or [0] * len(table),
            seed=config.seed,
            init_temperature=config.init_temperature,
            reduce_rate=config.reduce_rate,
        )
    history = []
    for t in complete:
        tokens = trial_tokens(t, table)
        accepted = None
        if chain is not None and tokens is not None and t.value is not None:
            accepted = chain.update(t.number, tokens, t.value)
        history.append(_entry(t, table, accepted))
    best = max(history, key=lambda h: (h["reward"], -h["number"]))
    return SearchResult(
        best_tokens=best["tokens"],
        best_reward=best["reward"],
        history=history,
        failed=sum(t.state == TrialState.FAIL for t in trials),
    )
