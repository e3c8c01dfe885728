"""Re-export of ``core.errors`` (the exception family lives below every layer)."""

from core.errors import CladError, StaleError

__all__ = ["CladError", "StaleError"]
