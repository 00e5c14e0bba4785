#!/usr/bin/env bash
# The test command: installs and starts what the tests need on a fresh Debian machine, then
# runs every test of the workspace. Safe to run again: it only installs or starts what is
# missing, and stops what it started when it ends. Needs root (apt, services, and the
# disk-full test mounts a small tmpfs).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'test.sh: %s\n' "$*" >&2; }

# Commands that stop what this run started, run at exit in reverse order.
stops=()
cleanup() {
    local i
    for ((i = ${#stops[@]} - 1; i >= 0; i--)); do
        eval "${stops[i]}" >/dev/null 2>&1 || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir -p target

apt_updated=0
install() {
    if [ "$apt_updated" = 0 ]; then
        apt-get update -qq
        apt_updated=1
    fi
    log "installing $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# Polls a command until it succeeds, for at most $1 seconds.
wait_until() {
    local seconds=$1
    shift
    for _ in $(seq $((seconds * 10))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    "$@"
}

# --- Gearman tools and gearmand (interop and import tests), Perl's and PHP's Gearman clients ---
command -v gearman >/dev/null 2>&1 && command -v gearadmin >/dev/null 2>&1 || install gearman-tools
command -v gearmand >/dev/null 2>&1 || install gearman-job-server
perl -MGearman::Client -e1 >/dev/null 2>&1 || install libgearman-client-perl
php -r 'exit(class_exists("GearmanClient") ? 0 : 1);' >/dev/null 2>&1 || install php-cli php-gearman

# --- MariaDB: root over TCP with an empty password, database `test` ---
mariadb_ok() { mariadb -h 127.0.0.1 -u root -e 'SELECT 1' test; }
if ! mariadb_ok >/dev/null 2>&1; then
    command -v mariadbd >/dev/null 2>&1 || install mariadb-server mariadb-client
    if ! mariadb -u root -e 'SELECT 1' >/dev/null 2>&1; then
        log "starting MariaDB"
        mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld 2>/dev/null || true
        start-stop-daemon --start --oknodo --background --make-pidfile --pidfile target/test-mariadb.pid \
            --exec /usr/sbin/mariadbd -- --user=mysql
        stops+=("start-stop-daemon --stop --retry 30 --pidfile target/test-mariadb.pid --remove-pidfile")
        wait_until 30 mariadb -u root -e 'SELECT 1'
    fi
    mariadb -u root -e "
        CREATE DATABASE IF NOT EXISTS test;
        CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY '';
        GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;
        ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD('') OR unix_socket;
        FLUSH PRIVILEGES;"
    wait_until 10 mariadb_ok
fi

# --- PostgreSQL: trust on 127.0.0.1, roles postgres and root, database `test` ---
pg_ok() { psql -h 127.0.0.1 -U postgres -d test -c 'SELECT 1'; }
if ! pg_ok >/dev/null 2>&1; then
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || install postgresql postgresql-client
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    hba=/etc/postgresql/$version/main/pg_hba.conf
    if ! grep -q 'gearbox tests' "$hba"; then
        sed -i '1i host all all 127.0.0.1/32 trust # gearbox tests\nhost all all ::1/128 trust # gearbox tests' "$hba"
    fi
    log "starting PostgreSQL $version"
    if pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null; then
        stops+=("pg_ctlcluster --skip-systemctl-redirect $version main stop")
    else
        pg_ctlcluster --skip-systemctl-redirect "$version" main reload
    fi
    wait_until 30 runuser -u postgres -- psql -c 'SELECT 1'
    runuser -u postgres -- psql -qc "DO \$\$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'root') THEN CREATE ROLE root SUPERUSER LOGIN; END IF; END\$\$;"
    runuser -u postgres -- psql -tc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1 ||
        runuser -u postgres -- createdb test
    wait_until 10 pg_ok
fi

# --- Headless Chromium and playwright-core for the dashboard's browser test (tests/browser) ---
[ -x /usr/bin/chromium ] || install chromium
command -v npm >/dev/null 2>&1 || install nodejs npm
[ -d tests/browser/node_modules ] || (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error >/dev/null)

# --- OpenStack's gear (PyPI), a Gearman client and worker that speak TLS (tests/tls.rs) ---
gear_venv=$PWD/target/gear-venv
if ! "$gear_venv/bin/python" -c 'import gear' >/dev/null 2>&1; then
    python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || install python3-venv
    python3 -m venv "$gear_venv"
    "$gear_venv/bin/pip" install -q --disable-pip-version-check gear==0.16.0
fi
export GEARBOX_TEST_PYTHON=$gear_venv/bin/python

# --- A MongoDB-wire test server for the job log's MongoDB sink (crates/joblog/tests/mongo.rs) ---
# Started only when nothing listens on 27017, and then stopped at the end; the tool installs
# what it needs. Data under target/, so `cargo clean` removes it.
mongo_up() { (exec 3<>/dev/tcp/127.0.0.1/27017) 2>/dev/null; }
if [ -z "${GEARBOX_TEST_MONGO:-}" ]; then
    if ! mongo_up; then
        log "starting the MongoDB test server"
        mkdir -p target
        tool=../shared/tools/mongo-test-server
        if [ -x "$tool" ]; then
            PORT=27017 "$tool" start "$PWD/target/mongo-test-data" >/dev/null
            stops+=("PORT=27017 $tool stop")
        else
            # Without the workplace's tool: the same server (nx-27017 from PyPI) in a venv of ours.
            venv=$PWD/target/mongo-venv
            if [ ! -x "$venv/bin/nx-27017" ]; then
                python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || install python3-venv
                python3 -m venv "$venv"
                "$venv/bin/pip" install -q --disable-pip-version-check nx-27017==0.8.1 neosqlite==1.17.2
            fi
            mkdir -p target/mongo-test-data
            nohup setsid "$venv/bin/nx-27017" --host 127.0.0.1 -p 27017 --data-dir "$PWD/target/mongo-test-data" \
                -j WAL >target/mongo-test-server.log 2>&1 </dev/null &
            stops+=("kill $!")
            wait_until 30 mongo_up
        fi
    fi
    export GEARBOX_TEST_MONGO=mongodb://127.0.0.1:27017
fi

# In a process group of their own, so that an interrupted run stops the tests (and the servers
# they started) before the services above; waited for, so that the traps run when it ends.
setsid cargo test --workspace --no-fail-fast "$@" &
tests=$!
stops+=("kill -TERM -- -$tests")
wait "$tests"
