"""Configuration, workspace, stage bookkeeping and the command line of CLAD."""

import os

# Offline means offline: huggingface_hub (imported by timm) reads this once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
