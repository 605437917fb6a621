# Shared helpers of scripts/dev and scripts/test: install what is missing, from Debian's
# packages, so both work on a fresh machine.

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
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
      echo "cargo is missing: install the Rust toolchain (rustup) first" >&2
      exit 1
    fi
  fi
}

# Makes sure PostgreSQL answers on 127.0.0.1:5432 with trust auth and a database "test".
ensure_postgres() {
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    apt_install postgresql
  fi
  if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    if ! grep -q "^host all all 127.0.0.1/32 trust" "$hba" 2>/dev/null; then
      # A fresh Debian install asks for passwords on TCP; tests connect as postgres
      # without one, as on the machines this project runs on.
      $SUDO sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
    fi
    echo "== starting PostgreSQL $version"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start
    for _ in $(seq 1 60); do
      pg_isready -q -h 127.0.0.1 -p 5432 && break
      sleep 0.5
    done
  fi
  if ! psql -h 127.0.0.1 -U postgres -d test -c 'select 1' >/dev/null 2>&1; then
    psql -h 127.0.0.1 -U postgres -c 'create database test' >/dev/null
  fi
}
