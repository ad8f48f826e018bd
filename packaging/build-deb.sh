#!/bin/sh
# Build the Debian package of this checkout:  packaging/build-deb.sh OUTDIR [DPKG-BUILDPACKAGE-ARGS...]
#
# dpkg-buildpackage wants debian/ at the top of the source tree, while this
# project keeps it in packaging/debian.  So the tree (the files git tracks,
# plus new files it does not ignore) is copied to a temporary directory,
# packaging/debian is put at its top, and the package is built there.  The
# .deb, .buildinfo and .changes files land in OUTDIR.
# Needs: dpkg-dev, debhelper, dh-python, pybuild-plugin-pyproject and the
# Build-Depends of packaging/debian/control (dpkg-checkbuilddeps says which
# are missing).  Default arguments: -us -uc -b (unsigned, binary only).
set -eu

# A Debian package is built with Debian's python3, not one from a virtual
# environment or a version manager that happens to come first in PATH.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV PYENV_VERSION 2>/dev/null || true

if [ $# -lt 1 ]; then
	echo "usage: $0 OUTDIR [DPKG-BUILDPACKAGE-ARGS...]" >&2
	exit 2
fi
mkdir -p "$1"
outdir=$(cd "$1" && pwd)
shift
[ $# -gt 0 ] || set -- -us -uc -b

top=$(cd "$(dirname "$0")/.." && pwd)
version=$(sed -n '1s/^vgpu-launch (\([^)]*\)).*/\1/p' "$top/packaging/debian/changelog")
upstream=$(cd "$top" && python3 -c 'import re,sys; print(re.search(r"^__version__ = \"([^\"]+)\"", open("vgpu_launch/__init__.py").read(), re.M).group(1))')
if [ "$version" != "$upstream" ]; then
	echo "$0: packaging/debian/changelog is at $version but vgpu_launch.__version__ is $upstream;" >&2
	echo "$0: add a changelog entry (dch -v $upstream) before building" >&2
	exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/vgpu-launch-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
src=$work/vgpu-launch-$version
mkdir "$src"

cd "$top"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
	# tracked files and new, not ignored ones; files deleted in the work tree are skipped
	git ls-files -z --cached --others --exclude-standard |
		tar --null --files-from=- --ignore-failed-read --warning=no-failed-read -cf - |
		tar -xf - -C "$src"
else
	tar --exclude=.git --exclude=.venv --exclude=__pycache__ --exclude='*.egg-info' \
		--exclude=./build --exclude=./dist -cf - . | tar -xf - -C "$src"
fi
rm -rf "$src/debian"
cp -a "$top/packaging/debian" "$src/debian"

(cd "$src" && dpkg-buildpackage "$@")

found=no
for f in "$work"/*.deb "$work"/*.buildinfo "$work"/*.changes; do
	[ -e "$f" ] || continue
	cp "$f" "$outdir/"
	echo "$outdir/${f##*/}"
	found=yes
done
[ "$found" = yes ] || { echo "$0: no package was built" >&2; exit 1; }
