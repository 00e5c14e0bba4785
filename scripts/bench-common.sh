# shellcheck shell=bash
# Shell helpers the benchmark scripts share; sourced, not run.

log() { printf '%s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# A port nothing listens on.
free_port() {
    local port _
    for _ in $(seq 100); do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
    die "no free port found"
}
