"""Registration without a user import: fresh interpreters that never import spallm_plugins themselves."""

import sysconfig
from pathlib import Path

import pytest
import torch
from conftest import needs, run_python
from safetensors.torch import save_file

PTH = Path(sysconfig.get_paths()["purelib"]) / "spallm_plugins_autoregister.pth"

LOAD_AND_COMPARE = """
import sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
kind = type(m.model.layers[0].self_attn.q_proj).__name__
with torch.no_grad():
    same = torch.equal(m(torch.arange(24).view(2, 12) % 30).logits, load_file(sys.argv[2])["logits"])
print(kind, "EQUAL" if same else "DIFFERENT")
"""


@pytest.fixture
def expected_logits(tmp_path, sketched_dir):
    from spallm_plugins.pipeline import load_sketched

    model, _ = load_sketched(sketched_dir)
    with torch.no_grad():
        logits = model(torch.arange(24).view(2, 12) % 30).logits
    save_file({"logits": logits}, tmp_path / "expected.safetensors")
    return tmp_path / "expected.safetensors"


def needs_pth():
    needs("pth", "install the package (pip install . or -e .)")


def test_pth_registers_on_transformers_import_without_user_import(sketched_dir, expected_logits):
    needs_pth()
    code = "import sys\n" + LOAD_AND_COMPARE + "\nprint('spallm_plugins.integrations.transformers' in sys.modules)"
    proc = run_python(code, str(sketched_dir), str(expected_logits))
    assert "SketchedLinear EQUAL" in proc.stdout


def test_opt_out_variable_disables_the_hook(sketched_dir, expected_logits):
    needs_pth()
    proc = run_python(LOAD_AND_COMPARE, str(sketched_dir), str(expected_logits), env={"SPALLM_NO_AUTOREGISTER": "1"})
    assert "Linear DIFFERENT" in proc.stdout and "SketchedLinear" not in proc.stdout


def test_finder_registers_after_the_trigger_module_executes(sketched_dir, expected_logits):
    code = "import spallm_plugins._autoregister\n" + LOAD_AND_COMPARE
    proc = run_python(code, str(sketched_dir), str(expected_logits), env={"SPALLM_NO_AUTOREGISTER": ""})
    assert "SketchedLinear EQUAL" in proc.stdout


def test_late_install_registers_immediately_and_is_idempotent():
    code = """
import os
os.environ["SPALLM_NO_AUTOREGISTER"] = "1"
import transformers.quantizers.auto as auto
import spallm_plugins._autoregister as ar
assert "spallm" not in auto.AUTO_QUANTIZER_MAPPING
os.environ["SPALLM_NO_AUTOREGISTER"] = ""
ar.install(); ar.install(); ar.ensure_registered()
from spallm_plugins.integrations.transformers import register
register(); register()
print(auto.AUTO_QUANTIZER_MAPPING["spallm"].__name__)
"""
    assert "SpaLLMHfQuantizer" in run_python(code, env={"SPALLM_NO_AUTOREGISTER": "1"}).stdout


def test_editable_wheel_installs_the_pth_file_too(tmp_path):
    """``pip install -e .`` (PEP 660): setuptools builds an editable wheel; ours must carry the .pth."""
    import shutil
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    if not (root / "setup.py").is_file():
        pytest.skip("needs the source tree (setup.py)")
    needs("setuptools", "the build backend (nox -s tests installs it)")
    project = tmp_path / "src"
    project.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "spallm_plugins_autoregister.pth"):
        shutil.copy(root / name, project / name)
    for folder in ("spallm_plugins", "integrations"):
        shutil.copytree(root / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__"))
    code = "from setuptools import build_meta; import sys; print(build_meta.build_editable(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dist")], cwd=project, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = tmp_path / "dist" / proc.stdout.strip().splitlines()[-1]
    names = zipfile.ZipFile(wheel).namelist()
    assert "spallm_plugins_autoregister.pth" in names, names
    assert zipfile.ZipFile(wheel).read("spallm_plugins_autoregister.pth") == (root / PTH.name).read_bytes()


def test_importing_the_integration_before_transformers_still_registers(sketched_dir, expected_logits):
    """``from spallm_plugins.integrations.transformers... import X`` is what first imports transformers'
    quantizers: the automatic registration then fires while our quantizer module is half-imported."""
    code = "import spallm_plugins._autoregister\nimport spallm_plugins.integrations.transformers.trainer\n"
    proc = run_python(code + LOAD_AND_COMPARE, str(sketched_dir), str(expected_logits),
                      env={"SPALLM_NO_AUTOREGISTER": ""})  # fmt: skip
    assert "SketchedLinear EQUAL" in proc.stdout
    assert "registration via transformers failed" not in proc.stderr
