#!/bin/sh
# Install what vgpu-launch's tests and examples need on a Debian/Ubuntu machine (as root),
# and make two virtual environments:
#   .venv        Debian's python3 with Debian's python3-ptrace, python3-prctl, python3-structlog
#                (the versions the Debian package depends on), plus the test tools from PyPI;
#   .venv-pypi   the same python3 with current python-ptrace, python-prctl, structlog from PyPI.
set -eu
cd "$(dirname "$0")/.."

packages="gcc gcc-multilib libc6-dev-i386 musl-tools golang-go libcap-dev strace gdb procps
  python3 python3-venv python3-dev python3-pip python3-ptrace python3-prctl python3-structlog
  debootstrap dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all
  python3-setuptools lintian rpm util-linux iproute2 groff-base
  podman runc uidmap slirp4netns fuse-overlayfs jq"
missing=""
for p in $packages; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

PY=/usr/bin/python3
if [ ! -x .venv/bin/python ]; then
  $PY -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check \
  "pytest>=7.2" "hypothesis>=6.36" "pexpect>=4.8" mypy ruff "tomli; python_version<'3.11'" \
  kubernetes-validate \
  py-spy  # the release tests attach it to a released Python process
if [ ! -x .venv-pypi/bin/python ]; then
  $PY -m venv .venv-pypi
fi
.venv-pypi/bin/python -m pip install -q --disable-pip-version-check \
  python-ptrace python-prctl structlog "pytest>=7.2" "hypothesis>=6.36" "pexpect>=4.8"
