"""Process-wide settings a qmtl process (the CLI, ``qmtl serve``) applies once at start."""

from __future__ import annotations

import gc

#: Allocations between young collections (CPython's default is 700). A campaign tick over a large
#: world builds hundreds of thousands of small objects that live for the tick; at the default, the
#: collector keeps promoting them and re-walks every live object about once per world, which cost
#: a third of the tick over 100 worlds x 1,000 strategies. Same idea and order of magnitude as
#: mypy's ``gc.set_threshold(200_000, ...)``; garbage cycles are still collected, less often.
GC_THRESHOLD = (50_000, 20, 20)


def tune_gc() -> None:
    """Collect garbage less often (see ``GC_THRESHOLD``); idempotent."""
    gc.set_threshold(*GC_THRESHOLD)
