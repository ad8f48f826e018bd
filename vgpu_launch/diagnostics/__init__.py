"""Diagnostics beside the launcher: ``doctor`` (will it work here?), ``status`` (is the preload
really mapped?), the verifier (proof of loading after each injection) and the checks on preload
libraries done before CMD starts."""
