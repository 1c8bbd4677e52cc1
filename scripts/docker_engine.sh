# Sourced by scripts/test_image.sh: find a Docker engine, or start one of our own.
#
# docker_engine_up sets DOCKER_CLI (the client to use) and exports DOCKER_HOST when it
# starts its own engine; it returns 1, with DOCKER_ENGINE_WHY set, when no engine can be had.
#
# - `docker info` works (a developer's laptop, a CI runner with Docker): that engine.
# - Else, as root on a Debian-like machine (apt-get): Debian's docker.io (Docker 20.10,
#   with its own BuildKit-capable client) and debootstrap are installed, and a dockerd of
#   our own is started on its own socket and data root, with networking flags that leave
#   the host's firewall, bridges and IP forwarding alone (every build and container then
#   uses --network host). It is stopped on exit, also on failure (docker_engine_down).
#
# The data root outlives the run (VLLM_WORKER_DOCKER_ROOT), so that the stand-in base
# image and the build cache are reused by the next run.

DOCKER_ENGINE_PID=""
DOCKER_ENGINE_LOG=""

docker_engine_up() {
    if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        DOCKER_CLI=$(command -v docker)
        echo "docker engine: the one 'docker info' reaches ($($DOCKER_CLI version --format '{{.Server.Version}}'))"
        return 0
    fi
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        DOCKER_ENGINE_WHY="no Docker engine answers 'docker info', and this is not a Debian-like machine with root to start one"
        return 1
    fi
    if [ ! -x /usr/sbin/dockerd ] || [ ! -x /usr/bin/docker ] || ! command -v debootstrap >/dev/null 2>&1; then
        echo "docker engine: installing Debian's docker.io and debootstrap"
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends docker.io debootstrap; } >/tmp/vllm-worker-apt.log 2>&1; then
            DOCKER_ENGINE_WHY="installing docker.io failed (see /tmp/vllm-worker-apt.log)"
            return 1
        fi
    fi
    # Debian's own client (20.10): it builds with BuildKit when DOCKER_BUILDKIT=1; the
    # client first on PATH may be a newer one without buildx.
    DOCKER_CLI=/usr/bin/docker
    local run_dir=/run/vllm-worker-docker
    local data_root=${VLLM_WORKER_DOCKER_ROOT:-/var/cache/vllm-worker/docker}
    mkdir -p "$run_dir" "$data_root"
    export DOCKER_HOST="unix://$run_dir/docker.sock"
    DOCKER_ENGINE_LOG="$run_dir/dockerd.log"
    setsid nohup /usr/sbin/dockerd --data-root "$data_root" --exec-root "$run_dir/exec" \
        --pidfile "$run_dir/dockerd.pid" --host "$DOCKER_HOST" --storage-driver overlay2 \
        --iptables=false --ip6tables=false --bridge=none --ip-forward=false \
        >"$DOCKER_ENGINE_LOG" 2>&1 </dev/null &
    DOCKER_ENGINE_PID=$!
    local tries
    for tries in $(seq 1 100); do
        if "$DOCKER_CLI" info >/dev/null 2>&1; then
            echo "docker engine: our own dockerd (pid $DOCKER_ENGINE_PID, $data_root), ready after $((tries / 10)).$((tries % 10)) s"
            return 0
        fi
        if ! kill -0 "$DOCKER_ENGINE_PID" 2>/dev/null; then
            break
        fi
        sleep 0.1
    done
    DOCKER_ENGINE_WHY="our dockerd did not start: $(tail -n 3 "$DOCKER_ENGINE_LOG" | tr '\n' ' ')"
    docker_engine_down
    return 1
}

docker_engine_down() {
    if [ -n "$DOCKER_ENGINE_PID" ] && kill -0 "$DOCKER_ENGINE_PID" 2>/dev/null; then
        kill "$DOCKER_ENGINE_PID" 2>/dev/null || true
        local tries
        for tries in $(seq 1 150); do
            kill -0 "$DOCKER_ENGINE_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$DOCKER_ENGINE_PID" 2>/dev/null || true
        echo "docker engine: our dockerd stopped"
    fi
    DOCKER_ENGINE_PID=""
}
