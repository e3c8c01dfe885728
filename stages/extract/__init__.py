"""Stage 1, extraction: images -> frozen backbone -> patch features in the Zarr cache.

``data`` (layouts, the image index, loading), ``demo_data`` (the built-in
set), ``synthesis`` (local anomalies), ``backbone`` and ``features`` (patch
rows), ``plan`` (shards and the data set's fingerprint), ``shards`` (one
shard's computation) and ``stage`` (running the pending shards, here or on Dask).
"""
