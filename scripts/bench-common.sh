# shellcheck shell=bash
# Shell helpers the benchmark scripts share; sourced, not run.

log() { printf '%s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# A port nothing listens on.
free_port() {
    local port _ low
    # Below the kernel's ephemeral range, so an outgoing connection cannot take it meanwhile.
    read -r low _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || low=32768
    ((low > 20000 + 1000)) || low=60000
    for _ in $(seq 100); do
        port=$((20000 + RANDOM % (low - 20000)))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
    die "no free port found"
}

# wait_serving PORT PID LOG SECONDS: waits until server PID answers the admin command `getpid`
# on PORT with its own PID, so it accepts and serves (a cluster node has joined, a database
# queue is loaded); dies with the server's LOG if it exits first or takes longer.
wait_serving() {
    local port=$1 pid=$2 server_log=$3 deadline=$((SECONDS + $4)) line
    while :; do
        line=
        if { exec 3<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null; then
            printf 'getpid\n' >&3
            read -r -t 2 line <&3 || true
            exec 3<&-
        fi
        [[ ${line%$'\r'} == "OK $pid" ]] && return 0
        kill -0 "$pid" 2>/dev/null || { cat "$server_log" >&2; die "the server (pid $pid) exited at startup"; }
        ((SECONDS < deadline)) || die "the server (pid $pid) did not answer on port $port within $4 s"
        sleep 0.05
    done
}

# median: the median of the numbers on standard input ("null" lines skipped), to two places,
# or "n/a" when there are none.
median() {
    { grep -v '^null$' || true; } | sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "n/a"; exit }
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "%.2f\n", m }'
}

# ratio X Y: X / Y to two places, or "n/a".
ratio() {
    awk -v x="$1" -v y="$2" 'BEGIN { if (x == "n/a" || y == "n/a" || y + 0 == 0) print "n/a"; else printf "%.2f", x / y }'
}
