"""`lyceum student train` as a process: stopped by SIGINT or SIGTERM, or by its teacher
killed mid-epoch, it exits with its code after a checkpoint, and `--resume` ends with the
weights of an uninterrupted run. Its stderr, a file, holds log lines, not tqdm's `\\r`."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lyceum.deploy.examples import digits
from lyceum.deploy.launcher import start_teacher
from tests._support.models import GO, REACHED
from tests._support.students import trainer_config
from tests._support.teachers import DIGITS, make_dump, save_checkpoint
from tests._support.trainers import TrainerProcess, torchrun, write_config

pytestmark = pytest.mark.integration

BATCHES = 20  # the digits' training split in batches of 64
TEACHER = 'lyceum.deploy.examples:teacher_cnn{"width": 8}'


def _final_weights(config: Path, ckpt: Path, *flags: str, name: str) -> dict[str, torch.Tensor]:
    with TrainerProcess(config, *flags, name=name) as run:
        assert run.wait() == 0, run.stderr()[-4000:]
    assert run.stdout().startswith("trained 2 epochs: final loss ")
    return torch.load(ckpt / "last.pt", weights_only=True)["model"]


def _assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value)


def _gated(raw: dict[str, Any], gate: Path) -> dict[str, Any]:
    """The same student, pausing at its third step until `gate/go` exists."""
    gate.mkdir()
    return {
        **raw,
        "model": "tests._support.models:gated_mlp",
        "model_kwargs": {"gate": str(gate), "at": 3},
    }


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dump(tmp_path_factory.mktemp("dump"), seed=0, dataset=digits("train"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, dump_dir: Path) -> dict[str, Any]:
    """Final weights of the offline run without a stop (a process too, like the runs
    compared with it)."""
    where = tmp_path_factory.mktemp("uninterrupted")
    path = write_config(where / "cfg.yaml", trainer_config(dump_dir, where / "ckpt"))
    return _final_weights(path, where / "ckpt", name="uninterrupted")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_checkpoints_in_the_first_epoch_and_resume_equals_uninterrupted(
    tmp_path: Path, dump_dir: Path, uninterrupted: dict[str, torch.Tensor], signum: int
) -> None:
    ckpt, gate = tmp_path / "ckpt", tmp_path / "gate"
    raw = trainer_config(dump_dir, ckpt, progress=True, log_every_s=0)
    path = write_config(tmp_path / "cfg.yaml", _gated(raw, gate))
    with TrainerProcess(path, name="stopped") as stopped:
        stopped.wait_for(gate / REACHED)  # inside step 3
        stopped.proc.send_signal(signum)
        (gate / GO).touch()
        assert stopped.wait() == 128 + signum
    name = signal.Signals(signum).name
    assert stopped.stderr().splitlines()[-1] == (
        f"lyceum: stopped by {name} at epoch 1/2, after batch 3/{BATCHES}: checkpoint "
        f"{ckpt / 'last.pt'}, weights {ckpt / 'model.safetensors'} (for --checkpoint); resume "
        f"with: lyceum student train {path} --resume"
    )
    state = torch.load(ckpt / "last.pt", weights_only=True)
    assert state["loader"] == {"epoch": 0, "seed": 3, "position": 3}
    assert state["written"] == f"on {name}" and state["epochs"] == []
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.pt", "model.safetensors"]

    resumed = _final_weights(path, ckpt, "--resume", name="resumed")
    _assert_same_weights(resumed, uninterrupted)

    first, second = stopped.stderr(), (tmp_path / "resumed.err").read_text()
    for log in (first, second):
        assert "\r" not in log
        assert f"teacher 'dump': offline, dir {dump_dir}, 1,257 samples in 5 shards" in log
        assert "knowledge logits: float" in log
    assert f"epoch 1/2: 3/{BATCHES} batch (15%)" in first  # log_every_s: 0, one per batch
    assert f"stopping {'on ' + name}: writing the checkpoint of epoch 1, batch 3/" in first
    assert (
        f"resumed from {ckpt / 'last.pt'} (written on {name}, in epoch 1, after batch 3): "
        f"continuing epoch 1/2 after batch 3/{BATCHES}"
    ) in second
    assert "epoch 1/2: loss " in second and "epoch 2/2: loss " in second


def test_a_teacher_killed_mid_epoch_exits_69_with_a_checkpoint_and_resume_equals_uninterrupted(
    tmp_path: Path,
) -> None:
    """The only replica is killed (-9) while the student is at step 3; with timeout_s 2
    the student gives up, saves the batches it stepped and exits 69; resumed against the
    teacher restarted on the same port, it ends with the weights of a run without the kill."""
    weights = save_checkpoint(tmp_path / "teacher.safetensors", seed=0)

    def serve(port: int = 0) -> Any:
        return start_teacher(
            TEACHER, dataset=DIGITS, checkpoint=weights, grpc_port=port, exit_after_s=300
        )

    gate = tmp_path / "gate"
    with serve() as teacher:
        port = teacher.port("grpc")
        online = {
            "cnn": {
                "endpoints": [teacher.endpoint("grpc")],
                "mode": "index",
                "timeout_s": 2,
                "request_timeout_s": 1,
            }
        }
        raw = {**trainer_config(Path(), tmp_path / "ckpt"), "teachers": online}
        ref = write_config(tmp_path / "ref.yaml", {**raw, "checkpoint_dir": str(tmp_path / "ref")})
        want = _final_weights(ref, tmp_path / "ref", name="uninterrupted")
        path = write_config(tmp_path / "cfg.yaml", _gated(raw, gate))
        with TrainerProcess(path, name="stopped") as stopped:
            stopped.wait_for(gate / REACHED)
            teacher.kill()
            assert teacher.proc.returncode == -signal.SIGKILL
            (gate / GO).touch()
            assert stopped.wait() == 69
    ckpt = tmp_path / "ckpt"
    state = torch.load(ckpt / "last.pt", weights_only=True)
    done = state["loader"]["position"]
    assert state["loader"]["epoch"] == 0 and 3 <= done < BATCHES
    assert state["written"] == "when the teachers became unavailable"
    last = stopped.stderr().splitlines()[-1]
    assert last.startswith("lyceum: teachers unavailable (")
    assert "no replica answered within 2s" in last
    assert last.count("teacher 'cnn'") == 1, last  # named once, by the client the loader wraps
    assert last.endswith(
        f") at epoch 1/2, after batch {done}/{BATCHES}: checkpoint {ckpt / 'last.pt'}, weights "
        f"{ckpt / 'model.safetensors'} (for --checkpoint); resume "
        f"once the teachers are back with: lyceum student train {path} --resume"
    )
    assert f"teacher 'cnn': online, 1 endpoint grpc://127.0.0.1:{port}, mode index" in (
        stopped.stderr()
    )
    with serve(port):
        got = _final_weights(path, ckpt, "--resume", name="resumed")
    _assert_same_weights(got, want)


@pytest.mark.parametrize("mode", ["signal", "teacher"])
def test_ddp_ranks_stop_at_the_same_batch_when_one_rank_is_stopped(
    tmp_path: Path, mode: str
) -> None:
    """Two ranks under torchrun; only rank 1 gets a SIGTERM (or loses its teacher). Both
    stop at the same batch, rank 0 saves that position, and each says why it stopped."""
    train_set = digits("train", limit=640)  # 320 ids per rank, 10 batches of 32
    dump = make_dump(tmp_path / "dump", seed=0, dataset=train_set)
    raw = trainer_config(dump, tmp_path / "ckpt", batch_size=32)
    dataset = raw["dataset"]
    assert isinstance(dataset, dict)
    raw["dataset"] = {**dataset, "train_kwargs": {"split": "train", "limit": 640}}
    path = write_config(tmp_path / "cfg.yaml", raw)
    worker = Path(__file__).with_name("ddp_stop_worker.py")
    returncode, output = torchrun(worker, str(path), str(tmp_path), mode)
    written = sorted(p.name for p in tmp_path.glob("rank*.json"))
    assert returncode == 0, (written, output[-4000:])
    ranks = [yaml.safe_load((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    state = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    # Nothing of the run (its DDP module holds the group) outlives the group's destruction.
    assert [r["ddp_at_destroy"] for r in ranks] == [[0], [0]]
    epoch, done = ranks[0]["stopped_at"]
    assert ranks[1]["stopped_at"] == [epoch, done] and epoch == 0 and 1 <= done < 10
    assert state["loader"] == {"epoch": 0, "seed": 3, "position": done}
    if mode == "signal":
        assert done == 3  # rank 1 signalled itself after step 3
        for r in ranks:
            assert r["ended"] == "signal" and r["signum"] == signal.SIGTERM
    else:
        assert [r["ended"] for r in ranks] == ["teachers_unavailable"] * 2
        assert "rank 1's teacher is gone (test)" in ranks[1]["error"]
        assert ranks[0]["error"] == "a teacher stayed unavailable on rank 1; its log has the error"
