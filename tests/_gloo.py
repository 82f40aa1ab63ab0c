"""A two-process gloo group for the distributed tests, with an exit that cannot abort.

torch 2.13's gloo worker thread drops its reference to a finished collective (and to that
collective's output tensors) a moment after ``wait()`` returns.  When that moment falls
inside interpreter finalization, releasing the tensors' Python objects cannot take the GIL,
the thread is unwound and the process aborts (SIGABRT, "terminate called without an active
exception") after all its work is done and written; ``destroy_process_group`` does not join
the thread.  Seen in about 1 run in 10 on a loaded 2-core machine (core dump: the abort is in
``AsyncAllgatherWork::~AsyncAllgatherWork`` on the gloo thread while the main thread is in
``Py_FinalizeEx``).  A worker that finished cleanly therefore leaves with ``os._exit(0)``,
skipping finalization; one that raised still raises, so ``mp.spawn`` reports its error.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


@contextmanager
def gloo_group(store: str, rank: int, timeout_s: float | None = None) -> Iterator[None]:
    """Join a 2-rank gloo group through the file ``store`` on one intra-op thread; destroy
    it on the way out and, when the body finished without an exception, end the process."""
    torch.set_num_threads(1)
    extra = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            **extra)
    try:
        yield
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
