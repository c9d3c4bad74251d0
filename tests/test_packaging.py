"""The package outside its checkout: the wheel holds every module and works in a fresh environment,
``saliency_r1.kernels`` is this checkout's own ``kernels/``, and the command line starts without torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import saliency_r1

REPO = Path(__file__).resolve().parents[1]


def _checkout_files(root: Path) -> list[str]:
    """The files of the checkout as a clone would have them: tracked, and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=root,
                            capture_output=True, check=True).stdout.decode()
    return [name for name in listed.split("\0") if name and os.path.lexists(root / name)]


def _copy_checkout(root: Path, target: Path) -> Path:
    for name in _checkout_files(root):
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, destination, follow_symlinks=False)  # saliency_r1/kernels stays a link
    return target


def test_saliency_r1_and_its_kernels_are_this_checkouts_own():
    """Fails when another checkout's package (or its kernels/, as setuptools' editable finder once mapped
    it) is the one imported: then this checkout's changes go untested."""
    import saliency_r1.kernels

    assert Path(saliency_r1.__file__).resolve().parent == REPO / "saliency_r1"
    assert [Path(p).resolve() for p in saliency_r1.kernels.__path__] == [REPO / "kernels"]


def test_python_started_in_the_checkout_imports_the_hugging_face_kernels_package():
    """transformers imports the Hugging Face ``kernels`` package (a dependency of transformers 5.25); the
    checkout's kernels/ must not stand in for it when the checkout's root is on sys.path (``python -m pytest``,
    a notebook there). It is a namespace package, which any regular package of the name outranks."""
    probe = ("import importlib.util, transformers.modeling_utils; spec = importlib.util.find_spec('kernels'); "
             "print(spec.origin if spec else None)")
    run = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    origin = run.stdout.strip()
    assert origin == "None" or Path(origin).resolve().parent != REPO / "kernels", origin


def test_a_second_checkout_imports_its_own_kernels(tmp_path):
    clone = _copy_checkout(REPO, tmp_path / "clone")
    reference = clone / "kernels" / "reference" / "reward.py"
    reference.write_text(reference.read_text() + "\nMUTATED_IN_THE_CLONE = True\n")
    probe = ("import saliency_r1.kernels.reference.reward as r; "
             "print(r.__file__, getattr(r, 'MUTATED_IN_THE_CLONE', False))")
    run = subprocess.run([sys.executable, "-c", probe], cwd=clone, capture_output=True, text=True, check=True)
    where, mutated = run.stdout.split()
    assert Path(where).resolve() == reference.resolve() and mutated == "True"
    own = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_packaging.py::test_saliency_r1_and_its_kernels_are_this_checkouts_own"],
                         cwd=clone, capture_output=True, text=True)
    assert own.returncode == 0, own.stdout[-2000:]


def test_the_command_line_and_configuration_start_without_torch():
    probe = textwrap.dedent("""
        import sys
        from saliency_r1.cli import build_parser
        from saliency_r1.grpo.config import parse_config
        build_parser().parse_args(["train", "--steps", "3"])
        parse_config(["--steps", "3"])
        print(sorted(name for name in ("torch", "transformers", "saliency_r1.ops") if name in sys.modules))
    """)
    run = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


WHEEL_PROBE = textwrap.dedent("""
    import importlib, json, pkgutil, sys
    from pathlib import Path

    import saliency_r1
    source = sys.argv[1]
    # saliency_r1._C is the compiled library, which saliency_r1.ops loads into torch (not a Python module).
    modules = sorted(m.name for m in pkgutil.walk_packages(saliency_r1.__path__, "saliency_r1.")
                     if m.name != "saliency_r1._C")
    for name in modules:
        importlib.import_module(name)

    import torch
    from PIL import Image
    from saliency_r1.adapters import get_adapter
    from saliency_r1.data.synthetic import SyntheticGroundedVQA
    from saliency_r1.prompts import SYSTEM_PROMPT, prompt_inputs
    from saliency_r1.saliency import saliency_for_completions
    from saliency_r1.tiny import build_tiny_model, build_tiny_processor

    processor = build_tiny_processor()
    model = build_tiny_model(processor)
    example = SyntheticGroundedVQA(1, seed=3)[0]
    inputs = prompt_inputs(processor, get_adapter(model), [example], SYSTEM_PROMPT)
    tokens = processor.tokenizer("<think>red dark</think><answer>dark</answer>", add_special_tokens=False)
    completion = torch.tensor(tokens["input_ids"] + [processor.tokenizer.eos_token_id])
    rollout = saliency_for_completions(model, processor, inputs, [completion])
    saliency_map = rollout.maps[0][0]
    from saliency_r1.explain import explain
    page = explain(model, processor, example["image"], example["problem"],
                   completion="<think>red dark</think><answer>dark</answer>").to_html()  # the packaged page
    print(json.dumps({"page_bytes": len(page), "page_filled": "/*__DATA__*/" not in page,
        "package": saliency_r1.__file__, "kernels": list(saliency_r1.kernels.__path__)[0], "modules": modules,
        "from_source": [p for p in sys.path if p and Path(p).resolve().is_relative_to(source)],
        "valid": float(rollout.valid[0]), "shape": list(saliency_map.shape),
        "finite": bool(torch.isfinite(saliency_map).all()), "nonzero": bool(saliency_map.abs().sum() > 0),
    }))
""")


@pytest.mark.slow
def test_wheel_installs_and_runs_in_a_fresh_environment(tmp_path):
    """Build the wheel from a clean copy of the checkout, install it with its dependencies into a new
    virtual environment, and use it from outside the source tree."""
    import torch

    source = _copy_checkout(REPO, tmp_path / "source")
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", str(source),
                    "-w", str(dist)], check=True, capture_output=True, text=True)
    (wheel,) = dist.glob("saliency_r1-*.whl")
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    for package in ("adapters", "data", "grpo"):
        assert f"saliency_r1/{package}/__init__.py" in names, package
    for module in ("kernels/reward.py", "kernels/layer_saliency.py", "kernels/checks.py", "kernels/reference/reward.py",
                   "kernels/reference/layer_saliency.py"):  # namespace subpackages: no __init__.py
        assert f"saliency_r1/{module}" in names, module
    assert any(n.startswith("saliency_r1/_C") and n.endswith(".so") for n in names)
    assert "saliency_r1/assets/flow.html" in names  # package data

    venv = tmp_path / "venv"
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        python, bin_dir = venv / "bin" / "python", venv / "bin"
        # The torch this suite runs on (its local build tag too), then the wheel and what it requires.
        install = subprocess.run([str(python), "-m", "pip", "install", "-q", f"torch=={torch.__version__}", str(wheel)],
                                 capture_output=True, text=True)
        assert install.returncode == 0, install.stderr[-3000:]
        check = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout
        environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
        probe = subprocess.run([str(python), "-I", "-c", WHEEL_PROBE, str(source)], cwd=tmp_path,
                               capture_output=True, text=True, env=environment)
        assert probe.returncode == 0, probe.stderr[-3000:]
        found = json.loads(probe.stdout.strip().splitlines()[-1])
        site = venv.resolve()
        assert Path(found["package"]).resolve().is_relative_to(site)
        assert Path(found["kernels"]).resolve().is_relative_to(site)
        assert found["from_source"] == []
        expected = sorted(f"saliency_r1.{p.relative_to(REPO / 'saliency_r1').with_suffix('').as_posix().replace('/', '.')}"
                          for p in (REPO / "saliency_r1").rglob("*.py") if p.name != "__init__.py")
        assert set(expected) <= set(found["modules"])
        assert found["valid"] == 1.0 and found["shape"] == [4, 4] and found["finite"] and found["nonzero"]
        assert found["page_filled"] and found["page_bytes"] > 10_000
        help_text = subprocess.run([str(bin_dir / "saliency-r1"), "--help"], cwd=tmp_path, capture_output=True,
                                   text=True, env=environment)
        assert help_text.returncode == 0 and "train" in help_text.stdout and "explain" in help_text.stdout
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # 2.5 GB
