"""Development sessions: ``nox`` runs them all; ``nox -s tests`` one of them."""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "docs"]
nox.options.reuse_existing_virtualenvs = True

PACKAGE = "checkmate"
TEST_COMMAND = ["python", "-m", "pytest"]
# The shared peer benchmark sits beside the repository (``<repo>/../shared``).
PEER_BENCH = Path(__file__).resolve().parent.parent / "shared" / "peer-bench"


@nox.session
def tests(session: nox.Session) -> None:
    """Run the whole test suite (the same command as the README and CI)."""
    # With the emulators' Python packages; Azurite comes from scripts/install-emulators.sh.
    session.install("-e", ".[test,emulators]")
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


@nox.session
def reliability(session: nox.Session) -> None:
    """Run the reliability suite in full size and rewrite docs/reliability.md with its figures.

    ``nox -s reliability -- --output /tmp/page.md`` writes elsewhere; any other
    argument after ``--`` goes to pytest. Not run by default (it takes minutes).
    """
    session.install("-e", ".[test]")
    session.run("python", "scripts/reliability_report.py", "--full", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """The performance suite (not part of the test run): prints the targets table and
    writes docs/performance.md and docs/img/per-stage-cost.png.

    ``nox -s bench -- --quick`` for a short run; other arguments go to benchmarks/bench.py.
    """
    requirements = PEER_BENCH / "requirements.txt"
    if not requirements.is_file():
        session.error(f"the shared peer benchmark is missing: {requirements} not found")
    session.install("-r", str(requirements))
    session.install("-e", ".", "moto[server]", "s3fs", "matplotlib")
    session.run(
        "python", "benchmarks/bench.py", *session.posargs, env={"PEER_BENCH_DIR": str(PEER_BENCH)}
    )
