# RunPod serverless worker: vLLM 0.32 (CUDA build, from vLLM's own image) + this package
# + the runpod SDK 1.12, serving Llama 2 7B Chat by default.
#
# Build arguments (all optional; empty means "not set"):
#   MODEL_NAME          public Hub repo id to serve    default meta-llama/Llama-2-7b-chat-hf
#   MODEL_REVISION      branch, tag or commit          default empty (= main)
#   TOKENIZER_NAME      tokenizer repo id              default empty (= MODEL_NAME)
#   TOKENIZER_REVISION  tokenizer revision             default empty (= MODEL_REVISION,
#                                                      as vLLM does)
#   QUANTIZATION        vLLM quantization, e.g. awq    default empty (= none)
#   LORA_MODULES        LoRA adapters, name=source pairs (source: a Hub repo id or a
#                       folder)                        default empty (= none); with
#                       BAKE_MODEL=1 the Hub repos are baked beside the model
#   BAKE_MODEL          1: download the model into the image now and run offline;
#                       0: the worker downloads it when it starts   default 0
#   HF_ENDPOINT         the Hub to download from                   default empty (= the
#                                                      Hugging Face Hub; a mirror, or the
#                                                      image test's stand-in)
#   BASE_IMAGE          the image to build on        default vllm/vllm-openai:v0.32.0
#                       (scripts/test_image.sh builds on a local stand-in for it: no
#                       registry can be reached there)
# All but BAKE_MODEL become the worker's ENV defaults (MODEL_NAME, MODEL_REVISION, ...);
# the endpoint's environment variables override them at run time.
#
# BAKE_MODEL is 0 by default because the RunPod Hub builds this file with its default
# arguments and no secret, and Llama 2 is gated: a default build must need no token. The
# README's build command bakes. Hugging Face token (gated models such as Llama 2): a
# BuildKit secret, mounted as a file for the download step only; it is never in a layer,
# an ENV, a build argument or the build log:
#   docker buildx build --build-arg BAKE_MODEL=1 --secret id=hf_token,env=HF_TOKEN \
#       -t you/vllm-worker:llama2 .
#
# A baked model lives in /models, a Hugging Face cache (HF_HUB_CACHE), with
# /models/manifest.json describing it. MODEL_NAME stays the public repo id: with
# HF_HUB_OFFLINE=1, vLLM finds the snapshot in the cache by that id itself.

# No `# syntax=` line: BuildKit's built-in frontend handles `RUN --mount`, and a syntax
# line makes every build pull a frontend image from Docker Hub.
ARG BASE_IMAGE=vllm/vllm-openai:v0.32.0

############################## wheel: this package ##############################
# Built in its own stage so that the final image holds the installed package only, not a
# source tree beside src/handler.py that would shadow it.
FROM ${BASE_IMAGE} AS wheel
WORKDIR /build
COPY pyproject.toml README.md ./
COPY src/ src/
RUN python3 -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

############################## the worker ##############################
FROM ${BASE_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# runpod 1.12 requires fastapi>=0.141.1 and vLLM 0.32 fastapi<0.137, which pip refuses to
# resolve: runpod goes in without its requirements, then those requirements minus fastapi
# (runpod only imports fastapi for its local dev server). Rarely changes: first layer. The
# requirements file is mounted, not copied: nothing of the build stays in /app.
RUN --mount=type=bind,source=requirements,target=/tmp/build/requirements \
    python3 -m pip install --no-cache-dir --no-deps runpod==1.12.0 \
    && python3 -m pip install --no-cache-dir -r /tmp/build/requirements/runpod.txt

# The model (~13.5 GB for Llama 2 7B), before the package: editing the worker's code does
# not download it again. HF_HOME points to a throw-away folder for the download's own
# caches (xet chunks), removed in the same layer; the builder is mounted, not copied.
ARG MODEL_NAME=meta-llama/Llama-2-7b-chat-hf
ARG MODEL_REVISION=""
# DL3064 flags names containing "TOKEN": these are the tokenizer's repo and revision.
# hadolint ignore=DL3064
ARG TOKENIZER_NAME=""
# hadolint ignore=DL3064
ARG TOKENIZER_REVISION=""
ARG LORA_MODULES=""
ARG BAKE_MODEL=0
ARG HF_ENDPOINT=""
ENV HF_HUB_CACHE=/models
RUN --mount=type=secret,id=hf_token,required=false \
    --mount=type=bind,source=builder,target=/tmp/build/builder \
    case "${BAKE_MODEL}" in \
        1) HF_HOME=/tmp/hf-build HF_ENDPOINT="${HF_ENDPOINT:-https://huggingface.co}" \
            python3 /tmp/build/builder/download_model.py \
                --model "${MODEL_NAME}" \
                --revision "${MODEL_REVISION}" \
                --tokenizer "${TOKENIZER_NAME}" \
                --tokenizer-revision "${TOKENIZER_REVISION:-${MODEL_REVISION}}" \
                --lora-modules "${LORA_MODULES}" \
                --dest /models \
                --token-file /run/secrets/hf_token \
            && rm -rf /tmp/hf-build ;; \
        0) echo "BAKE_MODEL=0: the worker downloads ${MODEL_NAME} when it starts" ;; \
        *) echo "BAKE_MODEL must be 1 or 0, not '${BAKE_MODEL}'" >&2 && exit 1 ;; \
    esac

# This package, not editable and without its requirements: pydantic, transformers,
# huggingface_hub and tokenizers come with vLLM. Then check that nothing this worker needs
# is missing or too old (runpod's fastapi requirement is the one known exception).
RUN --mount=type=bind,from=wheel,source=/wheels,target=/tmp/wheels \
    python3 -m pip install --no-cache-dir --no-deps /tmp/wheels/*.whl \
    && { python3 -m pip check | grep -E '^(vllm-worker|runpod) ' | grep -v fastapi \
        > /tmp/broken-requirements || true; } \
    && if [ -s /tmp/broken-requirements ]; then cat /tmp/broken-requirements >&2; exit 1; fi \
    && rm -f /tmp/broken-requirements \
    && python3 -c "import vllm_worker.settings, runpod"

COPY src/handler.py /app/src/handler.py
# `docker run IMAGE` without RunPod's variables runs this job once (local test mode).
COPY test_input.json /app/test_input.json

ARG QUANTIZATION=""
# HF_HUB_OFFLINE is BAKE_MODEL (1 or 0, checked above): a baked image never calls the Hub.
# hadolint ignore=DL3064
ENV MODEL_NAME=${MODEL_NAME} \
    MODEL_REVISION=${MODEL_REVISION} \
    TOKENIZER_NAME=${TOKENIZER_NAME} \
    TOKENIZER_REVISION=${TOKENIZER_REVISION:-${MODEL_REVISION}} \
    QUANTIZATION=${QUANTIZATION} \
    LORA_MODULES=${LORA_MODULES} \
    HF_HUB_OFFLINE=${BAKE_MODEL}

# Replaces the base image's `vllm serve` entry point. Arguments given to `docker run`
# go to the handler (e.g. --test_input '{"input": {...}}'); for a shell, use
# `docker run --entrypoint bash`.
ENTRYPOINT ["python3", "-u", "/app/src/handler.py"]
CMD []
