"""What every layer shares: the settings dataclasses and their keys, the error
family, and the file idioms (atomic writes, seeding). Imports nothing of
``pipeline``, ``stages`` or ``cache``."""
