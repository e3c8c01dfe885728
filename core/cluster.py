"""The Dask client of ``--scheduler`` (extraction and scoring spread their work the same way).

``local`` starts a LocalCluster of worker processes on this machine (one thread each, at most
two: the machines here have two cores); an address (``tcp://host:port``) joins a running
scheduler. An unreachable scheduler is one line.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from core.errors import CladError


@contextmanager
def dask_client(scheduler: str, workers: int = 0) -> Iterator[Any]:
    """A ``dask.distributed.Client`` for ``--scheduler`` (``workers``: a LocalCluster's size, 0 = min(2, cores))."""
    from dask.distributed import Client, LocalCluster

    cluster = None
    if scheduler == "local":
        cluster = LocalCluster(n_workers=workers or max(1, min(2, os.cpu_count() or 1)), threads_per_worker=1,
                               processes=True, dashboard_address=None)
    try:
        try:
            client = Client(cluster if cluster is not None else scheduler)
        except OSError as exc:
            raise CladError(f"--scheduler {scheduler}: cannot reach the Dask scheduler ({exc}); "
                            "check the address or use --scheduler local") from None
        with client:
            yield client
    finally:
        if cluster is not None:
            cluster.close()
