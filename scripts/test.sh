#!/bin/sh
# Set up (scripts/setup.sh) and run every test: lint and types, the whole suite on Debian's
# library versions, and the core suite again on current PyPI versions.
set -eu
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check vgpu_launch tests bench packaging gpu examples
.venv/bin/ruff format --check vgpu_launch tests bench packaging gpu examples
.venv/bin/mypy --strict vgpu_launch
VGPU_LAUNCH_PYTHON=$PWD/.venv-pypi/bin/python .venv-pypi/bin/python -m pytest -q -p no:cacheprovider \
  tests/unit tests/launcher/test_shapes.py
# A smoke run of the benchmark: every workload in every mode must run (no timing thresholds).
VGPU_LAUNCH_PYTHON=$PWD/.venv/bin/python .venv/bin/python bench/run.py --quick --idle-seconds 2 >/dev/null
PYTHON=$PWD/.venv/bin/python VGPU_LAUNCH_PYTHON=$PWD/.venv/bin/python gpu/run.sh --dry-run >/dev/null
# Missing root or tools must fail the system tests here, not skip them.
export VGPU_TEST_REQUIRE_SYSTEM=1
VGPU_LAUNCH_PYTHON=$PWD/.venv/bin/python exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
