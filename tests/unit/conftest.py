"""Unit tests: vgpu_launch's functions on their own, with data made in the test (no vgpu-launch
process; a few start a child or make files to look at). Shared fixtures: ../conftest.py."""
