"""Heads: registered by name, created and loaded through one front door.

Importing this package registers every head; add a head by writing one
module with a ``@register_head`` class and importing it here.
"""

from stages.heads import clad, knn, rlr, routed_knn  # noqa: F401 - registers the heads
from stages.heads.base import Head, TrainContext
from stages.heads.registry import (
    accepted_run_keys,
    head_class,
    head_names,
    load_trained_head,
    register_head,
    run_changes,
    run_key,
    run_settings,
)

__all__ = ["Head", "TrainContext", "accepted_run_keys", "head_class", "head_names", "load_trained_head",
           "register_head", "run_changes", "run_key", "run_settings"]
