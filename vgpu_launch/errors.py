"""vgpu-launch's own failures and their exit codes (CMD's own exit status passes through).

Every exit code vgpu-launch chooses itself is defined here, once.
"""

from __future__ import annotations

EXIT_PROBLEM_FOUND = 1  # doctor: a check failed; status: a process lacks a library;
# release: a process was not given back
EXIT_USAGE = 2  # bad command line, configuration file, environment variable or preload library
EXIT_CANNOT_TRACE = 125  # vgpu-launch cannot run CMD here: ptrace refused, fork failed, or a
# Python module it needs (deps.py) is missing
EXIT_NOT_EXECUTABLE = 126  # CMD found but cannot be executed (the shell's and env(1)'s convention)
EXIT_NOT_FOUND = 127  # CMD not found


class LaunchError(Exception):
    """A one-line message for the user and the exit code that goes with it."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


class ConfigError(LaunchError):
    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_USAGE)
