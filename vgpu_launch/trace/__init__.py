"""Following the process tree: the ptrace event loop and the injection at each exec.

``tracer`` runs the event loop; ``injector`` rewrites a program's initial stack at its exec
event, deciding with ``policy`` (pure) on the layout that ``stack`` parses and rebuilds (pure);
``preload`` merges LD_PRELOAD values (pure); ``ptracelib`` is the only module that calls ptrace.
"""
