"""The launcher's behaviour seen from outside, with real processes: the preload reaching every
process shape, and vgpu-launch being transparent (exit status, signals, job control, what CMD
inherits, PID 1, reaping).

The programs are tests/programs (fixture ``programs``, ../conftest.py); vgpu-launch runs through
``bin/vgpu-launch`` (support/launch.py: ``run`` to the end, ``started`` as a direct child of the
test when its wait status or its stops matter); every wait is bounded by a deadline on an
observable event (support/procs.py: ``wait_for``), and every process a test starts is killed
with its process group or session at the end."""
