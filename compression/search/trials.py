"""One worker's copy of a study's trials, read incrementally and indexed for the search loop.

A finished trial never changes again, so a worker keeps every trial it has seen finished and,
at each `refresh`, reads from the storage only the trials it has not seen finished: the new
ones and the ones that were running. On a relational storage that is one query for those rows
(Optuna's `RDBStorage._get_trials`, the read its own `_CachedStorage` makes); the in-process
storages (in-memory, journal file) list their trials without a query, and only the unfinished
tail of that list is looked at. The questions the loop and the sampler ask of every trial (how
many completed, the best reward, whether a candidate is taken, a twin, an orphan to retry) are
kept up to date as trials arrive, so a trial costs the same with 10 or 10,000 in the study.

How a trial holds its candidate lives here too: one system attribute, `DRAW_ATTR` =
{"tokens": [...], "redraws": n} (the infeasible draws skipped before it), which `trial_tokens`
reads, along with the per-token parameters t00, t01, ... of studies written before it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from optuna.storages import RDBStorage, _CachedStorage
from optuna.trial import FrozenTrial, TrialState

if TYPE_CHECKING:
    import optuna

__all__ = [
    "CACHED_ATTR",
    "DRAW_ATTR",
    "DUPLICATE_ATTR",
    "ERROR_ATTR",
    "SURPLUS_ATTR",
    "StudyTrials",
    "draw_attr",
    "param_names",
    "trial_tokens",
]

DRAW_ATTR = "lyceum:draw"
CACHED_ATTR = "lyceum:cached_from"
DUPLICATE_ATTR = "lyceum:duplicate_of"
SURPLUS_ATTR = "lyceum:surplus"
ERROR_ATTR = "lyceum:error"
# A failed trial with one of these is not retried: its candidate was never lost (a duplicate,
# a surplus trial) or it failed on its own (the objective raised).
_NOT_RETRIED = (ERROR_ATTR, DUPLICATE_ATTR, SURPLUS_ATTR)

_LIVE = (TrialState.RUNNING, TrialState.WAITING)

Tokens = tuple[int, ...]


def param_names(table: Sequence[int]) -> list[str]:
    """The Optuna parameter of each token: t00, t01, ... (sorted as the tokens are)."""
    width = len(str(len(table) - 1))
    return [f"t{i:0{width}d}" for i in range(len(table))]


def draw_attr(tokens: Sequence[int], redraws: int) -> dict[str, Any]:
    """The value of `DRAW_ATTR` for `tokens` drawn after `redraws` infeasible draws."""
    return {"tokens": [int(t) for t in tokens], "redraws": int(redraws)}


def trial_tokens(trial: FrozenTrial, table: Sequence[int]) -> list[int] | None:
    """The tokens of `trial`, if it has them: its `DRAW_ATTR`, else (a study written before
    there was one) its per-token params or the params it was enqueued with."""
    drawn = trial.system_attrs.get(DRAW_ATTR)
    if drawn is not None:
        return list(drawn["tokens"])
    params = trial.params or trial.system_attrs.get("fixed_params") or {}
    names = param_names(table)
    if not all(n in params for n in names):
        return None
    return [int(params[n]) for n in names]


class StudyTrials:
    """The trials of `study` as this worker last read them (`refresh`), in number order."""

    def __init__(self, study: optuna.Study, table: Sequence[int]) -> None:
        self._storage = study._storage
        self._study_id = study._study_id
        backend = self._storage
        if isinstance(backend, _CachedStorage):
            backend = backend._backend
        self._rdb = backend if isinstance(backend, RDBStorage) else None
        self.table = list(table)
        self._trials: list[FrozenTrial] = []
        self._tokens: list[Tokens | None] = []
        self._number_of_id: dict[int, int] = {}
        self._unfinished: dict[int, FrozenTrial] = {}
        self._max_trial_id = -1
        #: Trials [0, finished_prefix) are all finished: what the SA chain can cache.
        self.finished_prefix = 0
        #: Completed trials, and the best reward among them.
        self.complete = 0
        self.best: float | None = None
        # tokens -> the lowest-numbered completed trial of them.
        self._completed: dict[Tokens, int] = {}
        # Failed trials whose candidate may need a retry (no completed twin yet), by number.
        self._retry: dict[int, Tokens] = {}
        self._live_tokens: set[Tokens] = set()

    def __len__(self) -> int:
        return len(self._trials)

    def __getitem__(self, number: int) -> FrozenTrial:
        return self._trials[number]

    def refresh(self) -> None:
        """Read the trials that are new, or were unfinished at the previous refresh."""
        for trial in self._read():
            self._add(trial)
        while (
            self.finished_prefix < len(self._trials)
            and self._trials[self.finished_prefix].state.is_finished()
        ):
            self.finished_prefix += 1
        self._live_tokens = {
            tokens
            for number, trial in self._unfinished.items()
            if trial.state in _LIVE and (tokens := self._tokens[number]) is not None
        }

    def _read(self) -> list[FrozenTrial]:
        if self._rdb is not None:
            return self._rdb._get_trials(
                self._study_id,
                states=None,
                included_trial_ids={t._trial_id for t in self._unfinished.values()},
                trial_id_greater_than=self._max_trial_id,
            )
        # In-process storages: the listing is a list in number order, nothing to query.
        listed = self._storage.get_all_trials(self._study_id, deepcopy=False)
        return listed[self.finished_prefix :]

    def _add(self, trial: FrozenTrial) -> None:
        number = trial.number
        if number < len(self._trials) and number not in self._unfinished:
            return  # seen finished already: it cannot have changed
        if number == len(self._trials):
            self._trials.append(trial)
            self._tokens.append(None)
        elif number > len(self._trials):
            # Trial numbers are given in creation order, under the study's lock, and the reads
            # ask for every trial newer than the newest seen: a gap is a storage out of order.
            raise RuntimeError(
                f"study {self._study_id}: the storage returned trial {number} before trial "
                f"{len(self._trials)}; open the study again to re-read it from the start"
            )
        self._trials[number] = trial
        self._number_of_id[trial._trial_id] = number
        self._max_trial_id = max(self._max_trial_id, trial._trial_id)
        tokens = trial_tokens(trial, self.table)
        self._tokens[number] = None if tokens is None else tuple(tokens)
        if not trial.state.is_finished():
            self._unfinished[number] = trial
            return
        self._unfinished.pop(number, None)
        if trial.state == TrialState.COMPLETE and trial.value is not None:
            self.complete += 1
            self.best = trial.value if self.best is None else max(self.best, trial.value)
            if tokens is not None:
                key = tuple(tokens)
                self._completed[key] = min(self._completed.get(key, number), number)
        elif (
            trial.state == TrialState.FAIL
            and tokens is not None
            and not any(attr in trial.system_attrs for attr in _NOT_RETRIED)
        ):
            self._retry[number] = tuple(tokens)

    def create(self, template: FrozenTrial) -> FrozenTrial:
        """Create a trial from `template` (its state, system attributes) in one write, and
        return it as created, with its number; it joins this copy at the next refresh."""
        if self._rdb is not None:
            # What `_CachedStorage.create_new_trial` calls: it returns the trial it made, where
            # the public call returns the id alone, which would take a read to number.
            return self._rdb._create_new_trial(self._study_id, template)
        return self._storage.get_trial(self._storage.create_new_trial(self._study_id, template))

    def is_current_for(self, trial: FrozenTrial) -> bool:
        """Whether `trial`, just created with a candidate drawn from this copy, can be checked
        for twins against it without reading the study again: no trial was created since the
        refresh (`trial` has the next number), no live trial is still without a candidate (a
        draw through Optuna's `ask` could pick the same), and its candidate is not taken."""
        tokens = trial_tokens(trial, self.table)
        return (
            trial.number == len(self._trials)
            and tokens is not None
            and not self.is_taken(tuple(tokens))
            and all(self._tokens[n] is not None for n in self._unfinished)
        )

    def by_id(self, trial_id: int) -> FrozenTrial:
        """The trial of storage id `trial_id`, as last read."""
        return self._trials[self._number_of_id[trial_id]]

    def live(self) -> list[FrozenTrial]:
        """The running and waiting trials, in number order."""
        return sorted(
            (t for t in self._unfinished.values() if t.state in _LIVE), key=lambda t: t.number
        )

    def finished_since(self, start: int) -> Iterator[FrozenTrial]:
        """The finished trials numbered `start` and up, in number order."""
        for trial in self._trials[start:]:
            if trial.state.is_finished():
                yield trial

    def latest_complete(self, count: int) -> list[FrozenTrial]:
        """The `count` highest-numbered completed trials with a candidate, in number order."""
        found: list[FrozenTrial] = []
        for trial in reversed(self._trials):
            if len(found) == count:
                break
            if (
                trial.state == TrialState.COMPLETE
                and trial.value is not None
                and self._tokens[trial.number] is not None
            ):
                found.append(trial)
        return found[::-1]

    def is_taken(self, tokens: Tokens) -> bool:
        """Whether a completed, running or waiting trial has `tokens` as its candidate."""
        return tokens in self._completed or tokens in self._live_tokens

    def orphan(self) -> list[int] | None:
        """Tokens of the lowest failed trial that should have finished and has no twin."""
        for number in sorted(self._retry):
            tokens = self._retry[number]
            if tokens in self._completed:
                del self._retry[number]  # completed since: never an orphan again
            elif tokens not in self._live_tokens:
                return list(tokens)
        return None

    def twin(self, me: int, tokens: Tokens) -> FrozenTrial | None:
        """A completed trial of the same tokens, else a lower-numbered running one."""
        completed = self._completed.get(tokens)
        if completed is not None and completed != me:
            return self._trials[completed]
        running = [
            t
            for number, t in self._unfinished.items()
            if number < me and t.state == TrialState.RUNNING and self._tokens[number] == tokens
        ]
        return min(running, key=lambda t: t.number) if running else None

    def ahead(self, me: int) -> int:
        """The trials numbered below `me` that completed or are live."""
        completed_after = sum(
            t.state == TrialState.COMPLETE and t.value is not None for t in self._trials[me + 1 :]
        )
        live_before = sum(
            number < me and t.state in _LIVE for number, t in self._unfinished.items()
        )
        return self.complete - completed_after + live_before
