"""Opening a study's storage, and the heartbeat that tells a live trial from a dead worker's.

Optuna's own heartbeat (`RDBStorage(heartbeat_interval=...)` + `fail_stale_trials`) exists for
relational storages only; its `JournalStorage` has none. So the heartbeat here is one mechanism
for every storage: a thread writes the time into the running trial's system attributes every
`heartbeat_interval` seconds, and any worker fails a running trial whose last beat is older than
`grace_period`. A failed trial's candidate is then handed out again by the search loop
(`lyceum.compression.search.study`), never lost.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna
    import optuna.storages
    from optuna.storages import BaseStorage
    from optuna.trial import FrozenTrial

__all__ = ["HEARTBEAT_ATTR", "STALE_ATTR", "Heartbeat", "fail_stale_trials", "open_storage"]

HEARTBEAT_ATTR = "lyceum:heartbeat"
STALE_ATTR = "lyceum:stale"

_JOURNAL_PREFIX = "journal:"
# Several worker processes write one SQLite file: wait for its lock rather than fail at once.
_SQLITE_TIMEOUT_S = 120
_SCHEMA_ATTEMPTS = 5


def open_storage(url: str | None) -> BaseStorage:
    """The storage named by `url` (see `StudyConfig.storage` for the forms it takes)."""
    import optuna

    if url is None:
        return optuna.storages.InMemoryStorage()
    if url.startswith(_JOURNAL_PREFIX) or url.endswith(".journal"):
        path = Path(url.removeprefix(_JOURNAL_PREFIX))
        if not path.parent.is_dir():
            raise ValueError(
                f"storage {url!r}: directory {path.parent} does not exist; create it first"
            )
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        path = Path(url).absolute()
        if not path.parent.is_dir():
            raise ValueError(
                f"storage {url!r}: directory {path.parent} does not exist; create it first"
            )
        url = f"sqlite:///{path}"
    if not url.startswith("sqlite"):
        return _rdb_storage(url, {})
    storage = _rdb_storage(url, {"connect_args": {"timeout": _SQLITE_TIMEOUT_S}})
    _fast_sqlite(storage)
    return storage


def _rdb_storage(url: str, engine_kwargs: dict[str, Any]) -> optuna.storages.RDBStorage:
    """`RDBStorage(url)`, retried when another worker was creating the schema at the same
    moment: Optuna's `create_all` checks for each table, then creates it, so two workers that
    start on a fresh database both create, and one fails with "table already exists" (SQLite)
    or a duplicate key (PostgreSQL). The retry finds the tables the other one made."""
    import optuna
    from sqlalchemy.exc import DBAPIError

    for attempt in range(_SCHEMA_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except DBAPIError:
            if attempt == _SCHEMA_ATTEMPTS - 1:
                raise
            time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")  # the loop returns or raises


def _fast_sqlite(storage: optuna.storages.RDBStorage) -> None:
    """Write-ahead logging, synced at checkpoints: a trial commits some 20 times (one per
    parameter set), and a full fsync each time made the storage cost ~150 ms a trial; WAL also
    lets workers read while one writes. A power cut may lose the last trials, never corrupt."""
    from sqlalchemy import event

    def pragmas(connection: Any, record: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()  # connections opened before the listener reconnect with it


def _last_beat(trial: FrozenTrial) -> float:
    beat = trial.system_attrs.get(HEARTBEAT_ATTR)
    if isinstance(beat, int | float):
        return float(beat)
    # Not beaten yet (just started, or its worker died before the first beat): its start
    # time stands in.
    start = trial.datetime_start
    return start.timestamp() if start is not None else time.time()


def fail_stale_trials(
    study: optuna.Study, grace_period: float, trials: Sequence[FrozenTrial] | None = None
) -> list[int]:
    """Fail the running trials whose last heartbeat is older than `grace_period` seconds.

    `trials`: the study's trials if the caller has just listed them (saves a listing).
    Returns the numbers of the trials this call failed (another worker may fail one first).
    """
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    now = time.time()
    failed = []
    if trials is None:
        trials = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in trials:
        if trial.state != TrialState.RUNNING or now - _last_beat(trial) <= grace_period:
            continue
        try:
            study._storage.set_trial_system_attr(trial._trial_id, STALE_ATTR, now)
            if study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                failed.append(trial.number)
        except UpdateFinishedTrialError:
            continue  # it finished, or another worker failed it first
    return failed


class Heartbeat:
    """`with Heartbeat(storage, trial_id, interval):` beats every `interval` s until exit.

    The first beat comes `interval` after entry: until then a trial is judged by its start
    time, which the trial's worker wrote when it created the trial just before (a beat at entry
    would say the same, at the cost of a write per trial).
    """

    def __init__(self, storage: BaseStorage, trial_id: int, interval: float) -> None:
        self._storage = storage
        self._trial_id = trial_id
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lyceum-heartbeat", daemon=True)

    def _beat(self) -> None:
        self._storage.set_trial_system_attr(self._trial_id, HEARTBEAT_ATTR, time.time())

    def _run(self) -> None:
        from optuna.exceptions import UpdateFinishedTrialError

        while not self._stop.wait(self._interval):
            try:
                self._beat()
            except UpdateFinishedTrialError:
                return  # failed as stale by another worker (this one was too slow to beat)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
