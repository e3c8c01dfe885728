"""The three stages and the heads, below the command line (``pipeline``).

``extract`` (stage 1), ``train`` (what every head's training shares, and the
entry that fits the configured head), ``heads`` (one module per registered
head), ``evaluate`` (stage 3, scoring new images, export); ``search``,
``maps`` and ``metrics`` are the kernels every stage measures with. Imports
follow the data flow: evaluate -> heads -> train -> extract, and every stage
-> search, maps, metrics -> cache -> core (train's entry, ``train.stage``,
also asks the head registry for the head it fits).
"""
