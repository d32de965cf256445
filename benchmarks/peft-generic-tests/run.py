"""PEFT's generic tests (``tests/test_custom_models.py`` of PEFT's sdist) run against the ``spallm`` method.

Copies the sdist's tests to ``--work``, makes ``TestPeftCustomModel`` parametrize over ``spallm_cases.TEST_CASES``
and load ``SketchedMLP``, runs the SpaLLM cases and writes the counts and the failed tests to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
CASES_ANCHOR = "# For this test matrix, each tuple consists of:\n"
LOAD_ANCHOR = '        if model_id == "MLP":\n'
LOAD_SKETCHED = """        if model_id.startswith("Sketched"):
            from .spallm_cases import sketched

            return sketched(cls.from_pretrained(model_id.removeprefix("Sketched"), dtype=dtype))

"""


def prepare(peft_src: Path, work: Path) -> Path:
    """PEFT's tests in ``work/tests``, patched to run the SpaLLM cases; refuses a sdist it does not recognise."""
    tests = work / "tests"
    shutil.rmtree(tests, ignore_errors=True)
    shutil.copytree(peft_src / "tests", tests)
    (tests / "__init__.py").touch()
    shutil.copy(HERE / "spallm_cases.py", tests / "spallm_cases.py")
    path = tests / "test_custom_models.py"
    text = path.read_text()
    for anchor in (CASES_ANCHOR, LOAD_ANCHOR):
        if text.count(anchor) != 1:
            raise SystemExit(f"{path}: expected one {anchor.strip()!r} (made for PEFT 0.20.0's sdist)")
    text = text.replace(CASES_ANCHOR, "from .spallm_cases import TEST_CASES  # noqa: E402\n\n" + CASES_ANCHOR)
    path.write_text(text.replace(LOAD_ANCHOR, LOAD_SKETCHED + LOAD_ANCHOR))
    return tests


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("peft_src", type=Path, help="an unpacked PEFT sdist (peft-0.20.0/)")
    parser.add_argument("--work", type=Path, required=True, help="where the patched tests are run")
    parser.add_argument("--out", type=Path, required=True, help="the JSON summary to write")
    args = parser.parse_args(argv)
    tests = prepare(args.peft_src, args.work)
    target = f"{tests / 'test_custom_models.py'}::TestPeftCustomModel"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", target, "-k", "SpaLLM", "-rf", "--tb=no"]
    proc = subprocess.run(command, cwd=args.work, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    counts = {
        kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error)", lines[-1] if lines else "")
    }
    failed = sorted(line.split(" - ")[0].split("::", 2)[-1] for line in lines if line.startswith("FAILED "))
    summary = {"peft_src": args.peft_src.name, "counts": counts, "failed": failed}
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
