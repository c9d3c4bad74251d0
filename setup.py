"""Builds the CPU kernels with CMake against the torch that is installed; the package's metadata is
in pyproject.toml.

Install with ``pip install --no-build-isolation -e .``: build isolation would build against a
second torch pulled into a temporary environment, and the library would not load beside yours.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        try:
            import torch
            from torch.utils import cpp_extension
        except ImportError:
            sys.exit("saliency-r1 builds its CPU kernels against the installed torch: install torch first "
                     "(CPU: pip install torch==2.13.0), then pip install --no-build-isolation -e .")
        if shutil.which("cmake") is None:
            sys.exit("saliency-r1 builds its CPU kernels with CMake (>= 3.18), which is not on PATH: "
                     "install it (pip install cmake, or your system's package), then build again.")
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake", str(ROOT), f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DTORCH_INCLUDE_DIRS={';'.join(cpp_extension.include_paths())}",
            f"-DTORCH_LIBRARY_DIRS={';'.join(cpp_extension.library_paths())}",
            f"-DTORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DTORCH_VERSION={torch.__version__}",
            f"-DOUTPUT_DIR={target.parent}", f"-DOUTPUT_FILE={target.name}",
        ]
        subprocess.run(configure, cwd=build_dir, check=True)
        jobs = str(os.cpu_count() or 1)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


setup(
    ext_modules=[CMakeExtension("saliency_r1._C")],
    cmdclass={"build_ext": CMakeBuild},
)
