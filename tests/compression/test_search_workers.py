"""Several worker processes on one study: SQLite, a journal file, and a real PostgreSQL server.

Three workers run `run_search` on a toy space against one storage; one of them is killed with
SIGKILL in the middle of a trial. The others must fail its trial by heartbeat, train its
candidate again, and finish the study's trials with no candidate trained twice and none lost.
Every objective call leaves a file named by the worker and the tokens, so what was trained is
counted from outside the workers.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from optuna.trial import TrialState

from lyceum.compression.search import (
    DUPLICATE_ATTR,
    STALE_ATTR,
    SURPLUS_ATTR,
    StudyConfig,
    open_study,
    trial_tokens,
)
from tests._support.teachers import ENV
from tests._support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TABLE = [10] * 6
TRIALS = 12
HANG_GUARD_S = 240

# One worker: the toy space of test_search, an objective that takes a little while and leaves
# a file per call; the victim blocks in its first call until it is killed.
WORKER = """
import sys, threading, time
from pathlib import Path
from lyceum.compression.search import SAConfig, StudyConfig, run_search
from tests._support.waiting import wait_until

storage, calls, name, victim = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
TRIALS, METHOD = int(sys.argv[5]), sys.argv[6]
OPTIMUM = [3, 7, 1, 8, 5, 2]

class Space:
    def range_table(self): return [10] * 6
    def init_tokens(self): return [0] * 6
    def is_feasible(self, tokens): return sum(tokens) <= 30

def objective(tokens):
    (calls / f"{name}-{'-'.join(map(str, tokens))}").touch()
    if victim:
        threading.Event().wait()  # blocks until the test kills this worker
    # Trials take milliseconds of overhead now: without this, one live worker can finish the
    # study before the other has started. Each waits (bounded) until both have trained once.
    try:
        wait_until(
            lambda: all(list(calls.glob(f"{w}-*")) for w in ("w1", "w2")),
            "both live workers' first trial",
            timeout_s=60,
        )
    except AssertionError:
        pass  # a bound, not a check: the test itself counts every worker's trials
    time.sleep(0.05)  # a trial's cost on purpose (workers overlap), not a synchronisation
    return -sum((t - o) ** 2 for t, o in zip(tokens, OPTIMUM))

study = StudyConfig(storage=storage, study="shared", heartbeat_interval=0.5, grace_period=3)
config = SAConfig(max_iterations=TRIALS - 1, seed=0, method=METHOD, population=4, tournament=2)
run_search(Space(), objective, config, study=study, progress=False)
"""


def _stderr(worker: subprocess.Popen[bytes]) -> str:
    return worker.stderr.read().decode() if worker.stderr else f"exit {worker.returncode}"


def _start(
    storage: str, calls: Path, name: str, victim: bool, method: str = "annealing"
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            WORKER,
            storage,
            str(calls),
            name,
            "1" if victim else "0",
            str(TRIALS),
            method,
        ],
        stderr=subprocess.PIPE,
        env={**os.environ, **ENV},  # the worker imports the suite's wait_until
    )


def _three_workers_one_killed(storage: str, calls: Path, method: str = "annealing") -> None:
    calls.mkdir()
    victim = _start(storage, calls, "victim", victim=True, method=method)
    others: list[subprocess.Popen[bytes]] = []
    try:
        wait_until(
            lambda: list(calls.glob("victim-*")),
            "the victim starting a trial",
            gave_up=lambda: None if victim.poll() is None else _stderr(victim),
        )
        others = [_start(storage, calls, f"w{i}", False, method) for i in (1, 2)]
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=HANG_GUARD_S) == -signal.SIGKILL
        for worker in others:
            _, err = worker.communicate(timeout=HANG_GUARD_S)
            assert worker.returncode == 0, err.decode()
    finally:
        for worker in [victim, *others]:
            if worker.poll() is None:
                worker.kill()
            worker.wait()

    trials = open_study(StudyConfig(storage=storage, study="shared")).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == TRIALS  # none lost
    failed = [t for t in trials if t.state == TrialState.FAIL]
    # The victim's trial, failed by heartbeat; any other failure is a designed one: two live
    # workers that both handed out its candidate again, the higher-numbered trial left it to
    # the lower (DUPLICATE_ATTR) without training it; or two that both started the study's
    # last trial, the higher-numbered one left it to the lower (SURPLUS_ATTR).
    [killed] = [t for t in failed if STALE_ATTR in t.system_attrs]
    designed = (DUPLICATE_ATTR, SURPLUS_ATTR)
    assert all(any(a in t.system_attrs for a in designed) for t in failed if t is not killed), [
        t.system_attrs for t in failed
    ]
    killed_tokens = trial_tokens(killed, TABLE)
    assert killed_tokens == [0] * 6  # the victim was first: it took the initial tokens
    # Its candidate was completed by a live worker: handed out again as a retry (fixed
    # params), or drawn afresh by a worker that asked before the victim's trial was failed
    # (the initial tokens, either sampler's first draw while untaken); trained once either way.
    fresh = [t for t in complete if "lyceum:cached_from" not in t.system_attrs]
    [retry] = [t for t in fresh if trial_tokens(t, TABLE) == killed_tokens]
    assert retry.number > killed.number
    # No candidate trained twice: one call per distinct candidate, plus the killed one's.
    trained = [p.name.split("-", 1) for p in calls.iterdir()]
    by_tokens = [tokens for _, tokens in trained]
    assert by_tokens.count("0-0-0-0-0-0") == 2
    assert len(by_tokens) - 1 == len(set(by_tokens))
    assert {w for w, _ in trained} == {"victim", "w1", "w2"}
    # Every completed trial's candidate was trained, or copied from one that was.
    assert {"-".join(map(str, trial_tokens(t, TABLE) or [])) for t in fresh} == set(by_tokens)


@pytest.mark.parametrize("method", ["annealing", "evolution"])
def test_three_workers_on_one_sqlite_file(tmp_path: Path, method: str) -> None:
    _three_workers_one_killed(str(tmp_path / "search.db"), tmp_path / "calls", method)


def test_three_workers_on_one_journal_file(tmp_path: Path) -> None:
    _three_workers_one_killed(f"journal:{tmp_path / 'search.journal'}", tmp_path / "calls")


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A throw-away PostgreSQL cluster on a free loopback port, stopped in a finally."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip(
            "PostgreSQL's initdb/pg_ctl not found: install Debian's postgresql (.ci/run does)"
        )
    # initdb refuses to run as root: the cluster belongs to the postgres user then.
    as_user: list[str] = []
    root = tempfile.mkdtemp(prefix="lyceum-pg-")
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    data, port = Path(root) / "data", _free_port()
    try:
        subprocess.run(
            [*as_user, initdb, "-D", str(data), "-U", "lyceum", "--auth=trust", "-E", "UTF8"],
            check=True,
            capture_output=True,
        )
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
        subprocess.run(
            [*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", f"{root}/log", "-w", "start"],
            check=True,
            capture_output=True,
            timeout=HANG_GUARD_S,
        )
        try:
            yield f"postgresql://lyceum@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run(
                [*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"],
                check=False,
                capture_output=True,
                timeout=HANG_GUARD_S,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_three_workers_on_one_postgresql_server(tmp_path: Path, postgres_url: str) -> None:
    _three_workers_one_killed(postgres_url, tmp_path / "calls")
