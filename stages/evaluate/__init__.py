"""Stage 3 and after: scoring a trained run.

``stage`` (the cached test set scored, metrics and pictures written),
``report`` (metrics.csv and report.md), ``figures`` (heat maps, curves),
``score`` (new images, no cache: class, score, verdict) and ``export`` (a
deploy bundle for ``clad-run``). Maps and metrics are in ``stages.maps`` and
``stages.metrics``, shared with training's probe and calibration.
"""
