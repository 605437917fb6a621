# Shared helpers of scripts/dev and scripts/test: install what is missing, from Debian's
# packages, so both work on a fresh machine.

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "not root and no sudo: run as root, or install sudo, to let this script install packages" >&2
  fi
  SUDO="sudo"
fi
APT_UPDATED=""

apt_install() {
  if [ -z "$APT_UPDATED" ]; then
    echo "== apt-get update"
    $SUDO apt-get update -qq
    APT_UPDATED=1
  fi
  echo "== installing $*"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# need COMMAND PACKAGE: installs PACKAGE when COMMAND is missing.
need() {
  command -v "$1" >/dev/null 2>&1 || apt_install "$2"
}

need_rust() {
  if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
      export PATH="$HOME/.cargo/bin:$PATH"
    else
      echo "cargo is missing: install a Rust toolchain of rust-version (Cargo.toml) or newer" \
        "with rustup first (Debian's packaged one is too old)" >&2
      exit 1
    fi
  fi
  # Linking, the bundled SQLite and ring need a C compiler.
  need cc build-essential
}

# Makes sure PostgreSQL answers on 127.0.0.1:5432 with trust auth and a database "test".
ensure_postgres() {
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    apt_install postgresql
  fi
  # The cluster configured on port 5432 (with several versions installed, the newest may
  # be another one); else the newest.
  local version=""
  if command -v pg_lsclusters >/dev/null 2>&1; then
    version=$(pg_lsclusters -h 2>/dev/null | awk '$2 == "main" && $3 == 5432 { print $1; exit }')
  fi
  if [ -z "$version" ] && [ -d /etc/postgresql ]; then
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
  fi
  if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    if [ -z "$version" ]; then
      echo "PostgreSQL is not running and no Debian cluster is configured (/etc/postgresql)" >&2
      exit 1
    fi
    trust_local_tcp "$version"
    echo "== starting PostgreSQL $version"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start
    wait_for "PostgreSQL to accept connections" pg_isready -q -h 127.0.0.1 -p 5432
  fi
  # Installing the package may have started a server that asks for passwords on TCP: the
  # tests connect as postgres without one, as on the machines this project runs on.
  if ! pg_login postgres; then
    if [ -z "$version" ]; then
      echo "PostgreSQL refuses postgres@127.0.0.1 without a password (trust it in pg_hba.conf)" >&2
      exit 1
    fi
    trust_local_tcp "$version"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main reload
    wait_for "PostgreSQL to trust 127.0.0.1" pg_login postgres
  fi
  if ! pg_login test; then
    psql -w -h 127.0.0.1 -U postgres -d postgres \
      -c "create database test template template0 encoding 'UTF8'" >/dev/null
  fi
}

# pg_login DB: whether postgres@127.0.0.1 gets into DB without a password.
pg_login() {
  psql -w -h 127.0.0.1 -U postgres -d "$1" -c 'select 1' >/dev/null 2>&1
}

# trust_local_tcp VERSION: puts "host all all 127.0.0.1/32 trust" first in the cluster's
# pg_hba.conf (once).
trust_local_tcp() {
  local hba="/etc/postgresql/$1/main/pg_hba.conf"
  if ! $SUDO grep -q "^host all all 127.0.0.1/32 trust" "$hba" 2>/dev/null; then
    $SUDO sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
  fi
}

# wait_for WHAT COMMAND...: retries COMMAND for up to 30 s.
wait_for() {
  local what="$1"
  shift
  for _ in $(seq 1 60); do
    "$@" && return 0
    sleep 0.5
  done
  echo "timed out waiting for $what" >&2
  exit 1
}
