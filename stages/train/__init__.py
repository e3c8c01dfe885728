"""Stage 2, training: what every head's training reads and shares.

``context`` (the ``TrainContext`` a head's fit receives), ``labels`` (held-out
images, class or pseudo labels), ``epochs`` (the resumable epoch loop),
``losses`` (CLAD's losses), ``probe`` (the held-out CutPaste probe),
``calibrate`` (per-class verdict thresholds), ``routing`` (which class an image
is) and ``stage`` (fit the configured head). The heads themselves are in
``stages.heads``.
"""
