"""Machine-code checks of the decode kernels on a CPU (issue #38): compiled for sm90a by Triton's own
toolchain, their K loops read from the SASS (:mod:`spallm_plugins.kernels.triton.machine_code` says how
the loop is found and what is counted). The code-word GEMV must meet the limits at every autotuning
config; today's byte-wise GEMV breaks them, which shows the checks can fail.

Skipped only where triton's NVIDIA compiler or its bundled cuobjdump is absent; a nox session that
installed triton (``SPALLM_REQUIRE=triton``) fails instead.
"""

import json
import os

import pytest
from conftest import REQUIRED_VARIABLE, needs, run_python

needs("triton", "pip install '.[triton]' (nox -s tests installs it)")

SASS_TABLE = """
import json, sys
from spallm_plugins.kernels.triton.machine_code import sass_table, toolchain_refusal
if toolchain_refusal():
    print(json.dumps({"refusal": toolchain_refusal()}))
else:
    print(json.dumps({"rows": sass_table(bits_list=(4, 3, 2), dtypes=tuple(sys.argv[1].split(",")))}))
"""


@pytest.fixture(scope="module")
def sass_rows() -> list[dict]:
    """Every decode config compiled once, in a child process (this one may run the interpreter, whose
    ``@triton.jit`` functions cannot be compiled)."""
    proc = run_python(SASS_TABLE, "bf16", env={"TRITON_INTERPRET": "0"}, timeout=900)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    if "refusal" in got:
        required = {n.strip() for n in os.environ.get(REQUIRED_VARIABLE, "").split(",")}
        if "triton" in required:
            pytest.fail(f"no sm90 machine code: {got['refusal']}, but {REQUIRED_VARIABLE} says triton is installed")
        pytest.skip(f"no sm90 machine code: {got['refusal']}")
    return got["rows"]


def test_words_gemv_meets_the_machine_code_limits_at_every_config(sass_rows):
    from spallm_plugins.kernels.triton.lut_gemv_words import CONFIGS

    words = [row for row in sass_rows if row["kernel"] == "lut_gemv_words_kernel"]
    assert len(words) == 3 * len(CONFIGS)  # 4, 3 and 2 bits
    for row in words:
        assert row["violations"] == [], (row["config"], row["violations"])
        assert row["loop_instructions"] > 0 and min(int(w) for w in row["load_widths"]) >= 32  # JSON keys: str
    four_bit = [row["sass_per_weight"] for row in words if row["config"]["BITS"] == 4]
    assert max(four_bit) <= 6.0


def test_todays_byte_wise_gemv_fails_the_same_checks(sass_rows):
    """The kernel the code words replace at decode: cross-thread reductions and byte loads in its loop."""
    from spallm_plugins.kernels.triton.lut_gemv_bytes import CONFIGS

    old = [row for row in sass_rows if row["kernel"] == "lut_gemv_bytes_kernel"]
    assert len(old) == len(CONFIGS)
    for row in old:
        assert row["sass_per_weight"] > 6 and row["shuffles"] > 0 and row["barriers"] > 0, row
        assert any("narrower than 32 bits" in v for v in row["violations"])
    assert any(row["local_bytes"] > 0 or row["registers"] > 128 for row in old)  # the 16 x 512 tile spills


def test_the_prefill_matmul_over_code_words_compiles_without_local_memory(sass_rows):
    prefill = [row for row in sass_rows if row["kernel"] == "lut_matmul_words_kernel"]
    assert len(prefill) == 3 and all(row["violations"] == [] and row["loop_instructions"] > 0 for row in prefill)


def test_the_loop_is_found_by_its_backward_branch():
    from spallm_plugins.kernels.triton.machine_code import instructions, main_loop

    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0020*/                   FFMA R3, R4, R5, R3 ;
        /*0030*/              @!P0 BRA 0x10 ;
        /*0040*/                   LDG.E.128 R4, desc[UR6][R2.64] ;
        /*0050*/                   FFMA R3, R4, R5, R3 ;
        /*0060*/                   FFMA R3, R4, R5, R3 ;
        /*0070*/               @P1 BRA 0x40 ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x90;
    """
    loop = main_loop(instructions(sass))
    assert [op for _, op, _ in loop] == ["LDG.E.128", "FFMA", "FFMA", "BRA"]  # the larger innermost loop
    nested = sass.replace("/*0070*/               @P1 BRA 0x40", "/*0070*/               @P1 BRA 0x0")
    assert [op for _, op, _ in main_loop(instructions(nested))] == ["IADD3", "FFMA", "BRA"]  # not the outer one
