#!/usr/bin/env bash
# Every check that needs a GPU, in one prepared run (about 8-10 minutes on one H100 / H200):
#   bash scripts/gpu_check.sh          on a GPU machine; JSON lines and logs under $OUT (or ./gpu_check_out)
#   bash scripts/gpu_check.sh --cpu    the same steps at toy sizes on the CPU (tests/test_gpu_check.py)
# On a machine whose Python has torch, torchvision and lightning but not the rest (the lent GPU
# machine), the wheels in .whl/ (copied from ../shared/wheels/gpu-py312/) are installed first and the
# project runs from src/ without installing it. coco128 is read from .data/coco128 or ../shared/data/coco128.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import hydra, pycocotools, faster_coco_eval" 2>/dev/null; then
  if compgen -G ".whl/*.whl" > /dev/null; then
    python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "hydra, pycocotools or faster-coco-eval missing and no wheels in .whl/: pip install -e '.[dev]' first" >&2
    exit 1
  fi
fi
python -c "import anchordet" 2>/dev/null || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec python scripts/gpu_check.py "$@"
