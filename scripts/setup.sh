#!/usr/bin/env bash
# Installs everything Corral needs on a Debian host: system packages (when missing), a virtualenv
# in .venv, and the pinned Python dependencies. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v bwrap >/dev/null || need+=(bubblewrap)
command -v setpriv >/dev/null || need+=(util-linux)
[ -x /usr/bin/python3 ] || need+=(python3)  # the in-sandbox supervisor runs on the system python
command -v ip >/dev/null || need+=(iproute2)
command -v nft >/dev/null || need+=(nftables)  # network policy for sandboxes
command -v ps >/dev/null || need+=(procps)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)  # disk_mb: a file system per sandbox
command -v curl >/dev/null || need+=(curl)
command -v ssh >/dev/null || need+=(openssh-client)  # the tests of the SSH front
[ -d /usr/lib/python3/dist-packages/pip ] || need+=(python3-pip)  # pip inside sandboxes
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)  # fleet-mode tests
command -v skopeo >/dev/null || need+=(skopeo)  # pulls OCI images from registries and archives
command -v docker-registry >/dev/null || need+=(docker-registry)  # the image tests' registry
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)  # builds the tests' Debian image
[ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)  # mirror keys
command -v dpkg-deb >/dev/null || need+=(dpkg)  # builds the tests' local .deb packages
[ -x /usr/bin/chromium ] || need+=(chromium)  # the web console's browser tests (no browser download)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing system packages (${need[*]}); run as root or install them" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: Python >= 3.11 is required (found $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'

# The official JavaScript clients the face tests run (tests/js, pinned in its package-lock.json).
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  if [ "$(id -u)" -eq 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
  else
    echo "setup: node and npm are missing; the face tests of the JavaScript clients need them" >&2
  fi
fi
if command -v npm >/dev/null && ! cmp -s tests/js/package-lock.json tests/js/node_modules/.installed-lock; then
  (cd tests/js && npm ci --no-audit --no-fund --loglevel=error && cp package-lock.json node_modules/.installed-lock)
fi
