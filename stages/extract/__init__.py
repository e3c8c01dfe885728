"""Stage 1, extraction: images -> frozen backbone -> patch features in the Zarr cache.

``data`` (layouts, the image index, loading), ``demo_data`` (the built-in
set), ``synthesis`` (local anomalies), ``backbone`` and ``features`` (patch
rows) and ``shards`` (the plan, one shard's computation, and running the
pending shards, here or on Dask).
"""
