#!/usr/bin/env bash
# One-shot, idempotent set-up for a fresh machine (CPU or GPU). Called by the README's two commands and by CI.
# - With no NVIDIA GPU, installs the CPU build of torch FIRST so that no dependency range pulls a multi-GB CUDA
#   build. Override the wheel source with IVT_TORCH_INDEX_URL (a PyTorch wheel index) where the plain pin would
#   resolve to a CUDA build.
# - Then installs this project in editable mode with the test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PIN=${IVT_TORCH_VERSION:-2.13.0}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] GPU found: installing torch==$TORCH_PIN (CUDA build)"
    "$PY" -m pip install -q "torch==$TORCH_PIN"
  elif [ -n "${IVT_TORCH_INDEX_URL:-}" ]; then
    echo "[setup] no GPU: installing torch==$TORCH_PIN from $IVT_TORCH_INDEX_URL"
    "$PY" -m pip install -q "torch==$TORCH_PIN" --index-url "$IVT_TORCH_INDEX_URL"
  else
    echo "[setup] no GPU: installing the CPU build torch==$TORCH_PIN"
    "$PY" -m pip install -q "torch==$TORCH_PIN"
  fi
fi
if ! "$PY" -c "import ivt_env, agents, rollouts, transformers, peft, bitsandbytes, tensorboard, tyro, scipy, matplotlib, yaml, tqdm, pyarrow, tokenizers, pytest, hypothesis" >/dev/null 2>&1 || [ "${IVT_REINSTALL:-0}" = 1 ]; then
  echo "[setup] installing ivt (editable) with test extras"
  "$PY" -m pip install -q -e ".[dev]"
fi
