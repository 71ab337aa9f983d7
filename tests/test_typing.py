"""Type checkers see precise types: routers and session makers (mypy --strict on the
snippets in tests/typing/), and the package itself from an editable install."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SNIPPETS = Path(__file__).resolve().parent / "typing"
MYPY_OUTPUT = re.compile(
    r"^(?P<file>[\w.]+\.py):(?P<line>\d+): (?P<kind>error|note): (?P<text>.*)$"
)


@dataclass(frozen=True)
class Finding:
    """One line of mypy's output."""

    file: str
    line: int
    kind: str
    text: str


def expectations(name: str, tag: str) -> dict[int, str]:
    """Line number -> what the ``# <tag>: ...`` comment above that line expects."""
    lines = (SNIPPETS / name).read_text().splitlines()
    expected = {}
    for number, line in enumerate(lines, start=1):
        if match := re.match(rf"^\s*# {tag}: (.+)$", line):
            expected[number + 1] = match[1].strip()
    assert expected, f"{name} has no '# {tag}:' comments"
    return expected


def clean_env() -> dict[str, str]:
    """The environment without anything that points Python or mypy at this checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")}


def parse(output: str) -> list[Finding]:
    """mypy's findings in ``output``."""
    findings = []
    for line in output.splitlines():
        if match := MYPY_OUTPUT.match(line):
            findings.append(
                Finding(match["file"], int(match["line"]), match["kind"], match["text"])
            )
    return findings


def revealed_types(findings: list[Finding], file: str) -> dict[int, str]:
    """Line -> type revealed there in ``file``, without ``builtins.`` (which mypy
    versions print or not)."""
    return {
        f.line: f.text.removeprefix("Revealed type is ").strip('"').replace("builtins.", "")
        for f in findings
        if f.file == file and f.kind == "note" and f.text.startswith("Revealed type is ")
    }


@pytest.fixture(scope="module")
def mypy_findings(tmp_path_factory: pytest.TempPathFactory) -> list[Finding]:
    """mypy --strict on the snippets, run as a user's project would run it (outside
    this repository and its configuration), with this checkout's package."""
    work = tmp_path_factory.mktemp("typing")
    for snippet in SNIPPETS.glob("*.py"):
        shutil.copy(snippet, work)
    (work / "mypy.ini").write_text("[mypy]\nstrict = True\n")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-pretty", "--show-error-codes", "."],
        cwd=work,
        env={**clean_env(), "MYPYPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    findings = parse(result.stdout)
    assert findings, result.stdout + result.stderr
    return findings


def test_revealed_types_are_precise(mypy_findings: list[Finding]) -> None:
    """Sync and async routers expose engines typed as what they are, and
    sessionmaker(class_=X) is sessionmaker[X]: every reveal_type in
    tests/typing/router_types.py reveals the type written above it, and nothing in
    that file is an error (no cast needed for create_all(router.primary) or
    ``async with router.primary.begin()``)."""
    expected = expectations("router_types.py", "revealed")
    assert revealed_types(mypy_findings, "router_types.py") == expected
    errors = [f for f in mypy_findings if f.file == "router_types.py" and f.kind == "error"]
    assert errors == []


def test_routers_from_settings_are_typed_as_asked(mypy_findings: list[Finding]) -> None:
    """``ReplicaRouter.from_env()`` / ``from_settings()`` are typed as the class they are
    called on: ``ReplicaRouter[Engine]`` plain, ``ReplicaRouter[AsyncEngine]`` when
    written so; every reveal_type in tests/typing/settings_types.py reveals the type
    written above it, and nothing there is an error."""
    expected = expectations("settings_types.py", "revealed")
    assert revealed_types(mypy_findings, "settings_types.py") == expected
    errors = [f for f in mypy_findings if f.file == "settings_types.py" and f.kind == "error"]
    assert errors == []


def test_misuse_is_rejected(mypy_findings: list[Finding]) -> None:
    """The wrong session maker for the router's kind, a session class that does not
    route, and mixed sync/async engines are type errors: each line marked in
    tests/typing/router_misuse.py draws its error code, and no other line errs."""
    expected = expectations("router_misuse.py", "error")
    errors = {
        f.line: re.sub(r".*\[([\w-]+)\]$", r"\1", f.text)
        for f in mypy_findings
        if f.file == "router_misuse.py" and f.kind == "error"
    }
    assert errors == expected


USER_APP = '''\
"""A user's module: a sync router from URLs and a session maker of its own class."""

import sqlalchemy as sa

import sqlalchemy_replicas as sr
from sqlalchemy_replicas._editable_probe import PROBE


class AppSession(sr.RoutingSession):
    def greeting(self) -> str:
        return "hello"


router = sr.ReplicaRouter("sqlite://")
sa.MetaData().create_all(router.primary)
make_session = router.sessionmaker(class_=AppSession)
with make_session() as session:
    reveal_type(session.greeting())
reveal_type(make_session)
reveal_type(PROBE)
'''


def test_an_editable_install_is_visible_to_mypy(tmp_path: Path) -> None:
    """``pip install -e`` of the project into a fresh venv, then mypy --strict (installed
    there too) on a user's module outside the project: mypy finds the package, typed
    (py.typed), and reads it from the project's source directory."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, project)
    shutil.copytree(
        ROOT / "sqlalchemy_replicas",
        project / "sqlalchemy_replicas",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    venv = tmp_path / "venv"
    python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"

    def run(*command: str | Path, cwd: Path = tmp_path) -> str:
        result = subprocess.run(
            [str(part) for part in command],
            cwd=cwd,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    run(sys.executable, "-m", "venv", venv)
    run(python, "-m", "pip", "install", "--quiet", "--editable", project, "mypy")
    # Added after the install: only an editable install can see it.
    (project / "sqlalchemy_replicas" / "_editable_probe.py").write_text("PROBE = 42\n")
    user = tmp_path / "user"
    user.mkdir()
    (user / "app.py").write_text(USER_APP)
    output = run(python, "-m", "mypy", "--strict", "--no-pretty", "app.py", cwd=user)
    assert "Success: no issues found in 1 source file" in output
    assert revealed_types(parse(output), "app.py") == {
        18: "str",
        19: "sqlalchemy.orm.session.sessionmaker[app.AppSession]",
        20: "int",
    }
