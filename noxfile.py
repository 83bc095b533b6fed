"""Development sessions: ``nox`` runs them all; ``nox -s tests`` one of them."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "docs"]
nox.options.reuse_existing_virtualenvs = True

PACKAGE = "checkmate"
TEST_COMMAND = ["python", "-m", "pytest"]


@nox.session
def tests(session: nox.Session) -> None:
    """Run the whole test suite (the same command as the README and CI)."""
    session.install("-e", ".[test]")
    session.run(*TEST_COMMAND, *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff: lint and formatting."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", "checkmate", "tests", "examples", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package, and on the typing test of the public API."""
    session.install("-e", ".", "mypy>=1.10", "types-colorama")
    session.run("mypy", "--strict", PACKAGE, "tests/typing/api.py")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site with mkdocs --strict."""
    session.install("-e", ".", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26")
    session.run(
        "mkdocs",
        "build",
        "--strict",
        "--site-dir",
        session.create_tmp() + "/site",
        env={"NO_MKDOCS_2_WARNING": "1"},
    )
