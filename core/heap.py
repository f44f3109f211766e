"""The garbage collector of a serving process, router or worker, once it has started.

Python's collector runs a young collection every 700 net allocations of containers by
default: a streamed request makes thousands (coroutines, dicts, protobuf wrappers), and
every hundredth young collection is a full one, walking every object alive (modules, the
app, the tokenizer's tables, the engine): ~100 ms with nothing else running, on the router's
event loop or under the worker's GIL while its engine thread waits
(docs/operations-notes.md#gc-freeze-the-heap-once-a-process-serves).
"""

from __future__ import annotations

import gc

GC_THRESHOLDS = (20_000, 20, 20)


def settle_heap() -> None:
    """Once started: collects, then moves every object alive now out of the collector's
    view (``gc.freeze``: they live as long as the process), and collects less often. Full
    collections then walk only what was allocated since."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
