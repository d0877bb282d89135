#!/usr/bin/env bash
# Creates the project's virtual environment (.venv) if it is absent, in the one order that works:
# torch first (the CPU wheel), then FBGEMM's CPU build, TorchRec without its declared deps, then the rest.
# Set LIGHTNING_SKEW_CUDA=1 for the CUDA variant (see README: "CUDA machines").
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$here/.venv}
stamp=$venv/.lightning-skew-env
want="torch=2.13.0 fbgemm=1.8.0 torchrec=1.8.0 cuda=${LIGHTNING_SKEW_CUDA:-0} pyproject=$(sha1sum "$here/pyproject.toml" | cut -c1-12)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@"; }
if [ "${LIGHTNING_SKEW_CUDA:-0}" = 1 ]; then
  # CUDA: the matching CUDA builds from the PyTorch index (needs network to that index).
  pip install torch==2.13.0 --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}"
  pip install fbgemm-gpu==1.8.0 --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}"
else
  pip install torch==2.13.0
  pip install fbgemm-gpu-cpu==1.8.0
fi
# TorchRec's metadata asks for the CUDA fbgemm-gpu and pins an old torchmetrics: install it bare.
pip install --no-deps torchrec==1.8.0
pip install tensordict tqdm pyre-extensions iopath
pip install -e "$here[test]"
echo "$want" > "$stamp"
