"""Registration without a user import: fresh interpreters that never import spallm_plugins themselves."""

import os
import sysconfig
from pathlib import Path

import pytest
import torch
from conftest import run_python

PTH = Path(sysconfig.get_paths()["purelib"]) / "spallm_plugins_autoregister.pth"

LOAD_AND_COMPARE = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
kind = type(m.model.layers[0].self_attn.q_proj).__name__
with torch.no_grad():
    same = torch.equal(m(torch.arange(24).view(2, 12) % 30).logits, torch.load(sys.argv[2]))
print(kind, "EQUAL" if same else "DIFFERENT")
"""


@pytest.fixture
def expected_logits(tmp_path, sketched_dir):
    from spallm_plugins.pipeline import load_sketched

    model, _ = load_sketched(sketched_dir)
    with torch.no_grad():
        logits = model(torch.arange(24).view(2, 12) % 30).logits
    torch.save(logits, tmp_path / "expected.pt")
    return tmp_path / "expected.pt"


def needs_pth():
    if not PTH.is_file():
        if os.environ.get("SPALLM_REQUIRE_PTH") == "1":
            pytest.fail(f"{PTH} is not installed; the package must be installed from a wheel (nox does)")
        pytest.skip("editable install: the .pth hook is only installed by wheel installs (run via nox)")


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
