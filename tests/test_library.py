"""Loading the compiled CPU library: clear errors instead of "operator does not exist" later."""

import re

import pytest
import torch

from saliency_r1 import ops


def test_library_records_the_torch_it_was_built_for():
    (library,) = ops._PACKAGE_DIR.glob("_C*.so")
    assert ops._built_with_torch(library) == torch.__version__


def test_missing_library_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(ops, "_PACKAGE_DIR", tmp_path)
    with pytest.raises(ImportError, match=r"compiled CPU library \(_C\*\.so\) is missing.*pip install --no-build-isolation -e \."):
        ops._load_library()


def test_library_for_another_torch_names_both_versions(tmp_path, monkeypatch):
    (tmp_path / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF...saliency_r1 built with torch 2.11.0+cu130;\x00")
    monkeypatch.setattr(ops, "_PACKAGE_DIR", tmp_path)
    with pytest.raises(ImportError, match=rf"built for torch 2\.11\.0\+cu130, but torch {re.escape(torch.__version__)} is installed"):
        ops._load_library()


def test_unloadable_library_says_which_torch_it_was_built_for(tmp_path, monkeypatch):
    (tmp_path / "_C.so").write_bytes(f"not an ELF file; saliency_r1 built with torch {torch.__version__};".encode())
    monkeypatch.setattr(ops, "_PACKAGE_DIR", tmp_path)
    with pytest.raises(ImportError, match=rf"built for torch {re.escape(torch.__version__)}\) failed to load"):
        ops._load_library()


@pytest.mark.parametrize("op", ["reward", "layer_saliency"])
def test_cpu_kernels_come_from_the_compiled_library(op):
    # The dispatcher names the source of each registration: TORCH_LIBRARY_IMPL in our C++ file,
    # where a Python registration would name torch/library.py.
    name = f"saliency::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    cpu_line = next(line for line in torch._C._dispatch_dump(name).splitlines() if line.startswith("CPU:"))
    assert f"kernels/cpu/{op}.cpp" in cpu_line, cpu_line
