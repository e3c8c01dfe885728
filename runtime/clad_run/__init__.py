"""clad-run: score images with a bundle written by ``clad export`` (numpy, onnxruntime, pillow; no torch).

It imports nothing from the training project. The training project imports
one thing from here, ``clad_run.preprocess``, so that training, ``clad score``
and the runtime read and resize images with the same code.
"""

__version__ = "0.1.0"
