"""Robustness: faults and races provoked for real, strict mode, refusal of files others can
write (on the host and inside user namespaces), bad configuration, the soak, and a
differential test of the environment a real program sees.

vgpu-launch runs inside ``rtool reap`` in a session of its own (support/launch.py: ``run``,
``Tree``), which checks that nothing is left behind; ``user="nobody"`` runs it unprivileged.
Files that nobody must reach go in ``pub`` (../conftest.py), not in tmp_path."""
