#!/usr/bin/env bash
# Creates the project's virtual environment (.venv, or $VENV) if it is absent or out of date.
#
# The order matters: torch first (the CPU wheel; an unpinned torch would pull several GB of CUDA packages),
# then FBGEMM's CPU build, then TorchRec without its declared dependencies (they name the CUDA fbgemm-gpu
# and pin an old torchmetrics), then everything else from requirements.txt, then this package without deps.
#
# CUDA machines: LIGHTNING_SKEW_CUDA=1 scripts/env.sh installs the CUDA builds of torch and fbgemm-gpu from
# the PyTorch index instead (TORCH_INDEX_URL, default the cu128 index); the rest is the same.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$here/.venv}
cuda=${LIGHTNING_SKEW_CUDA:-0}
stamp="$venv/.lightning-skew-env"
want="torch=2.13.0 fbgemm=1.8.0 torchrec=1.8.0 cuda=$cuda reqs=$(cat "$here/requirements.txt" "$here/pyproject.toml" | sha1sum | cut -c1-12)"
# MovieLens-100k for the tests and recipes/dlrm_movielens.yaml, from inside the recbole wheel (never installed);
# once: skipped when the files are there, and a failed download (no network) is reported, not fatal.
fetch_movielens() {
  [ -f "$here/.data/ml-100k/ml-100k.inter" ] && [ -f "$here/.data/ml-100k/ml-100k.item" ] \
    && [ -f "$here/.data/ml-100k/ml-100k.user" ] && return 0
  "$venv/bin/python" "$here/scripts/fetch_movielens.py" "$here/.data/ml-100k" \
    || echo "scripts/env.sh: fetching MovieLens-100k failed; the tests that need it will skip" >&2
}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  fetch_movielens
  exit 0
fi
echo "scripts/env.sh: setting up $venv (a few minutes, once)" >&2
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@"; }
if [ "$cuda" = 1 ]; then
  index=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}
  pip install torch==2.13.0 --index-url "$index"
  pip install fbgemm-gpu==1.8.0 --index-url "$index"
else
  pip install torch==2.13.0
  pip install fbgemm-gpu-cpu==1.8.0
fi
pip install --no-deps torchrec==1.8.0
# --no-warn-conflicts: pip would report torchrec's declared (deliberately skipped) dependencies as conflicts.
pip install --no-warn-conflicts -r "$here/requirements.txt"
pip install --no-deps -e "$here"
"$venv/bin/python" -c "import torch, torchrec, fbgemm_gpu, lightning, lightning_skew" \
  || { echo "scripts/env.sh: the environment does not import; see the errors above" >&2; exit 1; }
echo "$want" > "$stamp"
fetch_movielens
