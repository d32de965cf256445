"""Ship ``spallm_plugins_autoregister.pth`` at the site-packages root, for wheel and editable installs.

The .pth file imports ``spallm_plugins._autoregister`` at interpreter start, which registers spallm with
transformers and PEFT when (and only when) those are imported. All other metadata is in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "spallm_plugins_autoregister.pth"
SOURCE = Path(__file__).parent / PTH


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        shutil.copy(SOURCE, Path(self.build_lib) / PTH)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


class EditableWheelWithPth(editable_wheel):
    """PEP 660 editable wheels put only setuptools' own .pth at the wheel root; add ours beside it.

    ``_run_build_commands`` receives the unpacked wheel root (setuptools >= 64); what is written there
    is installed into site-packages like any wheel file.
    """

    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
        result = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        shutil.copy(SOURCE, Path(unpacked_wheel) / PTH)
        return result


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
