"""The Zarr feature store and batch streaming (knows Zarr, nothing of models)."""
