"""Compression's file writer: the umask's mode (not 0600), atomic, errors naming the target."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lyceum.compression._io import write_bytes_atomic, write_json_atomic
from lyceum.compression.pruning import PrunePlan, load_pruned, save_pruned
from lyceum.compression.pruning.plan import PLAN_FILE, WEIGHTS_FILE
from lyceum.deploy.examples import student_mlp


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@contextlib.contextmanager
def _tmpfs(directory: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted on `directory` (tests run as root; CI is the same kind of machine)."""
    directory.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (not root?): {mounted.stderr.decode().strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_get_the_mode_the_umask_gives_any_file(tmp_path: Path, mask: int) -> None:
    with _umask(mask):
        plain = tmp_path / "plain.txt"
        plain.write_text("reference: what open() gives")
        write_bytes_atomic(tmp_path / "raw.bin", b"\x00\x01")
        write_json_atomic(tmp_path / "state.json", {"a": 1})
        save_pruned(student_mlp(), PrunePlan(input_shape=[1, 1, 8, 8]), tmp_path / "pruned")
    want = 0o666 & ~mask
    assert _mode(plain) == want
    for path in [
        tmp_path / "raw.bin",
        tmp_path / "state.json",
        tmp_path / "pruned" / PLAN_FILE,
        tmp_path / "pruned" / WEIGHTS_FILE,
    ]:
        assert _mode(path) == want, f"{path.name}: {oct(_mode(path))}, want {oct(want)}"
    assert json.loads((tmp_path / "state.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "plain.txt",
        "pruned",
        "raw.bin",
        "state.json",
    ]


def test_saved_weights_load_back_bit_for_bit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = student_mlp().eval()
    save_pruned(model, PrunePlan(input_shape=[1, 1, 8, 8]), tmp_path)
    rebuilt = load_pruned(student_mlp(), tmp_path)
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_a_full_disk_names_the_target_and_keeps_the_old_file(tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "small", "size=64k") as small:
        target = small / "sensitivity.json"
        write_bytes_atomic(target, b"previous")
        with pytest.raises(OSError) as info:
            write_bytes_atomic(target, b"x" * (256 * 1024))
        assert info.value.errno == errno.ENOSPC
        assert info.value.filename == str(target)
        assert "No space left on device" in str(info.value)
        assert target.read_bytes() == b"previous"
        assert [p.name for p in small.iterdir()] == ["sensitivity.json"]  # no temp file left


def test_a_read_only_directory_names_the_target(tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as read_only:
        target = read_only / "model.safetensors"
        with pytest.raises(OSError) as info:
            write_bytes_atomic(target, b"weights")
        assert info.value.errno == errno.EROFS
        assert info.value.filename == str(target)
