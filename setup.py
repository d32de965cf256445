"""Ship ``spallm_plugins_autoregister.pth`` at the site-packages root (wheel installs).

The .pth file imports ``spallm_plugins._autoregister`` at interpreter start, which registers spallm with
transformers and PEFT when (and only when) those are imported. All other metadata is in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "spallm_plugins_autoregister.pth"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        shutil.copy(Path(__file__).parent / PTH, Path(self.build_lib) / PTH)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})
