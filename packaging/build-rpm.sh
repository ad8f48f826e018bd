#!/bin/sh
# Build the RPM packages of this checkout:  packaging/build-rpm.sh OUTDIR [RPMBUILD-ARGS...]
#
# Makes vgpu-launch-VERSION.tar.gz from the tree (the files git tracks, plus
# new files it does not ignore), runs rpmbuild -ba on
# packaging/rpm/vgpu-launch.spec in a temporary _topdir, and copies the
# binary and source RPMs to OUTDIR.  On a system whose package manager is not
# RPM (Debian, in the project's CI) the build dependencies cannot be looked up
# in an RPM database, so --nodeps is added there; the tools the spec runs
# (python3 with build, installer, setuptools, ptrace, prctl, structlog) must
# then be installed with the system's own package manager.
set -eu

PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV PYENV_VERSION 2>/dev/null || true

if [ $# -lt 1 ]; then
	echo "usage: $0 OUTDIR [RPMBUILD-ARGS...]" >&2
	exit 2
fi
mkdir -p "$1"
outdir=$(cd "$1" && pwd)
shift

top=$(cd "$(dirname "$0")/.." && pwd)
spec=$top/packaging/rpm/vgpu-launch.spec
version=$(sed -n 's/^Version:[[:space:]]*//p' "$spec")
upstream=$(cd "$top" && python3 -c 'import re; print(re.search(r"^__version__ = \"([^\"]+)\"", open("vgpu_launch/__init__.py").read(), re.M).group(1))')
if [ "$version" != "$upstream" ]; then
	echo "$0: $spec is at $version but vgpu_launch.__version__ is $upstream" >&2
	exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/vgpu-launch-rpm.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
mkdir -p "$work/SOURCES" "$work/tree/vgpu-launch-$version"

cd "$top"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
	git ls-files -z --cached --others --exclude-standard |
		tar --null --files-from=- --ignore-failed-read --warning=no-failed-read -cf - |
		tar -xf - -C "$work/tree/vgpu-launch-$version"
else
	tar --exclude=.git --exclude=.venv --exclude=__pycache__ --exclude='*.egg-info' \
		--exclude=./build --exclude=./dist -cf - . | tar -xf - -C "$work/tree/vgpu-launch-$version"
fi
tar -C "$work/tree" --owner=0 --group=0 --numeric-owner -czf \
	"$work/SOURCES/vgpu-launch-$version.tar.gz" "vgpu-launch-$version"

nodeps=
rpm -q --quiet --whatprovides /usr/bin/python3 2>/dev/null || nodeps=--nodeps

rpmbuild -ba $nodeps --define "_topdir $work" "$@" "$spec"

for f in "$work"/RPMS/*/*.rpm "$work"/SRPMS/*.rpm; do
	[ -e "$f" ] || continue
	cp "$f" "$outdir/"
	echo "$outdir/${f##*/}"
done
