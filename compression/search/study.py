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
from datetime import datetime
from typing import Any, TypeGuard

import optuna
from optuna.trial import FrozenTrial, TrialState
from pydantic import BaseModel, ConfigDict, Field

from lyceum.compression.search.base import Objective, SearchSpace, canonical_tokens
from lyceum.compression.search.chain import SAChain, check_tokens
from lyceum.compression.search.config import SAConfig, StudyConfig
from lyceum.compression.search.evolution import EvolutionSampler
from lyceum.compression.search.sampler import FeasibleSampler, ProposingSampler, SASampler
from lyceum.compression.search.storage import Heartbeat, fail_stale_trials, open_storage
from lyceum.compression.search.trials import (
    CACHED_ATTR,
    DRAW_ATTR,
    DUPLICATE_ATTR,
    ERROR_ATTR,
    SURPLUS_ATTR,
    StudyTrials,
    draw_attr,
    trial_tokens,
)
from lyceum.proto.display import Progress

__all__ = [
    "SearchResult",
    "open_study",
    "run_search",
    "saved_sa_config",
    "search_result",
]

_log = logging.getLogger("lyceum.search")

_TABLE_ATTR = "lyceum:range_table"
_CHAIN_ATTR = "lyceum:chain"


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
    """The settings a study was searched with, annealing (what replays its chain) or
    evolution, or None for a study of another sampler (random, TPE) or none yet."""
    saved = _saved_chain(study)
    if not isinstance(saved, dict) or "sampler" in saved:
        return None
    return SAConfig.model_validate(saved)


def _saved_chain(study: optuna.Study) -> Any:
    """The study's saved chain settings; a study annealed before `method` and `warmup`
    existed saved neither."""
    saved = study.user_attrs.get(_CHAIN_ATTR)
    if _annealed_before_methods(saved):
        return {"method": "annealing", "warmup": 0} | saved
    return saved


def _annealed_before_methods(saved: Any) -> TypeGuard[dict[str, Any]]:
    """Whether `saved` settings are an annealing study's from before `method` and `warmup`."""
    return isinstance(saved, dict) and not {"sampler", "method"} & set(saved)


def _check_study(study: optuna.Study, table: list[int], chain: dict[str, Any]) -> None:
    """A study resumes only with the space and chain settings it was started with."""
    for key, mine in ((_TABLE_ATTR, table), (_CHAIN_ATTR, chain)):
        saved = _saved_chain(study) if key == _CHAIN_ATTR else study.user_attrs.get(key)
        if saved is None:
            study.set_user_attr(key, mine)
        elif saved != mine:
            differing = ""
            if isinstance(saved, dict) and isinstance(mine, dict):
                differing = f" ({_differences(saved, mine)})"
            raise ValueError(
                f"study {study.study_name!r}: saved {key.removeprefix('lyceum:')} {saved} "
                f"differs from this search's {mine}{differing}; use a new study name or the "
                "same settings to resume"
            )


def _differences(saved: dict[str, Any], mine: dict[str, Any]) -> str:
    """The settings that differ, each with its saved value and this search's."""
    keys = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
    return ", ".join(f"{k}: saved {saved.get(k)}, here {mine.get(k)}" for k in keys)


def _resumed(study: optuna.Study, config: SAConfig) -> SAConfig:
    """`config` for `study`: a study annealed before warm-ups existed resumes without one,
    unless `warmup` was set (a NAS search's default warm-up would not match its chain)."""
    if (
        config.method == "annealing"
        and _annealed_before_methods(study.user_attrs.get(_CHAIN_ATTR))
        and "warmup" not in config.model_fields_set
    ):
        return config.model_copy(update={"warmup": 0})
    return config


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
        init_tokens = canonical_tokens(space)(check_tokens(init_tokens, table, "init_tokens"))
    opt = open_study(study_config)
    chosen: ProposingSampler | FeasibleSampler
    if sampler is None:
        config = _resumed(opt, config)
        own = SASampler if config.method == "annealing" else EvolutionSampler
        chosen = own(space, config, init_tokens=init_tokens)
        chain = config.study_settings()
    else:
        chosen = FeasibleSampler(sampler, space, config.max_resample, config.seed)
        chain = {"sampler": type(sampler).__name__, "seed": config.seed}
    opt.sampler = chosen
    _check_study(opt, table, chain)
    target = config.max_iterations + 1
    trials = chosen.trials(opt)
    trials.refresh()
    poll = min(study_config.heartbeat_interval, 1.0)
    with Progress(
        total=target,
        desc=worker,
        unit="trial",
        initial=min(trials.complete, target),
        enabled=progress,
    ) as bar:
        while True:
            # Reads only the trials new or unfinished since the previous refresh.
            trials.refresh()
            if fail_stale_trials(opt, study_config.grace_period, trials.live()):
                trials.refresh()
            done = trials.complete
            if done > bar.n:
                bar.update(min(done, target) - bar.n)
            if done >= target:
                break
            orphan = trials.orphan()
            if orphan is None and done + len(trials.live()) >= target:
                time.sleep(poll)  # others are on the last trials; one may die and need a retry
                continue
            told = _one_trial(opt, chosen, trials, orphan, objective, study_config, target)
            if told is not None:
                if on_trial is not None:
                    on_trial(told[0])
                bar.update(0, best=f"{told[1]:.4f}")
    result = search_result(opt, table, config if sampler is None else None, init_tokens)
    return result


def _new_trial(
    study: optuna.Study,
    sampler: ProposingSampler | FeasibleSampler,
    trials: StudyTrials,
    orphan: list[int] | None,
) -> tuple[int, FrozenTrial | None]:
    """Create this worker's next trial, running, with its candidate (`orphan`, a retry, or a
    new draw): its storage id, and the trial as created when `trials` is current for it
    (`StudyTrials.is_current_for`: its twin check needs no read of the study).

    Annealing and evolution draw first and create the trial with its candidate in one write,
    so a trial is never seen without its candidate; they draw for the number the trial is
    expected to get (the next after the trials read), which another worker may take first:
    the draw stands then (a neighbour of the same chain, a child of the same population), and
    the twin check settles two equal ones. A trial
    waiting in the study (enqueued by hand) and the other samplers go through Optuna's `ask`.
    """
    waiting = any(t.state == TrialState.WAITING for t in trials.live())
    if isinstance(sampler, ProposingSampler) and not waiting:
        tokens, redraws = orphan, 0
        if tokens is None:
            tokens, redraws = sampler.propose(trials, len(trials))
        created = trials.create(
            FrozenTrial(
                number=-1,
                state=TrialState.RUNNING,
                value=None,
                datetime_start=datetime.now(),
                datetime_complete=None,
                params={},
                distributions={},
                user_attrs={},
                system_attrs={DRAW_ATTR: draw_attr(tokens, redraws)},
                intermediate_values={},
                trial_id=-1,
            )
        )
        current = orphan is None and trials.is_current_for(created)
        return created._trial_id, created if current else None
    if orphan is not None:
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.WAITING, system_attrs={DRAW_ATTR: draw_attr(orphan, 0)}
            )
        )
    trial = study.ask()
    try:
        # The sampler draws here, and writes the candidate once (`DRAW_ATTR`).
        _ = trial.relative_params
    except Exception as exc:
        _fail(study, trial._trial_id, exc)
        raise
    return trial._trial_id, None


def _one_trial(
    study: optuna.Study,
    sampler: ProposingSampler | FeasibleSampler,
    trials: StudyTrials,
    orphan: list[int] | None,
    objective: Objective,
    config: StudyConfig,
    target: int,
) -> tuple[dict[str, Any], float] | None:
    """Start, evaluate (or copy a twin's reward) and complete one trial: its history entry and
    the study's best reward (with this one's); None for a duplicate or a surplus trial (the
    study has `target` trials completed or under way before it)."""
    best = trials.best
    trial_id, mine = _new_trial(study, sampler, trials, orphan)
    storage = study._storage
    try:
        with Heartbeat(storage, trial_id, config.heartbeat_interval):
            if mine is None:
                # This trial, and every trial numbered below it with its candidate.
                trials.refresh()
                mine = trials.by_id(trial_id)
            tokens = trial_tokens(mine, trials.table)
            assert tokens is not None  # created with its candidate, or drawn by `ask`
            drawn = tuple(tokens)
            ahead = trials.ahead(mine.number)
            if ahead >= target:
                storage.set_trial_system_attr(trial_id, SURPLUS_ATTR, ahead)
                _finish(study, mine, TrialState.FAIL)
                return None
            twin = trials.twin(mine.number, drawn)
            if twin is not None and twin.state == TrialState.RUNNING:
                storage.set_trial_system_attr(trial_id, DUPLICATE_ATTR, twin.number)
                _finish(study, mine, TrialState.FAIL)
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
        _fail(study, trial_id, exc)
        raise
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM): failed, and its candidate handed out again on resume.
        _fail(study, trial_id, None)
        raise
    # Completed as the refresh read it: Optuna's `tell` would re-read it first.
    _finish(study, mine, TrialState.COMPLETE, reward)
    cached_from = None if twin is None else twin.number
    entry = _entry(mine, trials.table, None) | {"reward": reward, "cached_from": cached_from}
    best = reward if best is None else max(best, reward)
    _log.info(
        "trial %d: reward %.4f%s, tokens %s, %d redraws; best %.4f",
        mine.number,
        reward,
        f" (copied from trial {twin.number})" if twin is not None else "",
        ",".join(map(str, tokens)),
        entry["redraws"],
        best,
    )
    return entry, best


def _finish(
    study: optuna.Study, trial: FrozenTrial, state: TrialState, reward: float | None = None
) -> None:
    """`study.tell(trial, reward, state)` for the running `trial` just read: what Optuna's tell
    does (the sampler's `after_trial`, then the state and value), without re-reading it."""
    values = None if reward is None else [reward]
    try:
        study.sampler.after_trial(study, trial, state, values)
    finally:
        study._storage.set_trial_state_values(trial._trial_id, state, values)


def _fail(study: optuna.Study, trial_id: int, error: Exception | None) -> None:
    """Fail the trial of `trial_id` after `error` (then not retried) or an interruption."""
    if error is not None:
        study._storage.set_trial_system_attr(
            trial_id, ERROR_ATTR, f"{type(error).__name__}: {error}"
        )
    _finish(study, study._storage.get_trial(trial_id), TrialState.FAIL)


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
    if config is not None and config.method == "annealing":
        start = trial_tokens(complete[0], table) if init_tokens is None else list(init_tokens)
        chain = SAChain.of(config, table, start or [0] * len(table))
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
