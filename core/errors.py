"""The one exception family that library code raises for bad input.

Every message names the file or setting at fault and the fix; the CLI turns
these into one line on stderr and a non-zero exit, while real bugs keep their
tracebacks.
"""


class CladError(Exception):
    """Bad input or state that a user can fix (message says how)."""


class StaleError(CladError):
    """An earlier stage's output was produced with other settings."""
