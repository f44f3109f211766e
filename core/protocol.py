"""What both ends of the gRPC wire agree on, beyond the messages in
proto/electron/v1/worker.proto: the meaning of the finish reasons a worker sends.

Plain Python: the router and the workers import it.
"""

from __future__ import annotations

# A choice's last delta carries one of these (``GenerateResponse.finish_reason``).
FINISH_STOP = "stop"      # EOS, a stop string or a stop token
FINISH_LENGTH = "length"  # max_tokens, or the context window
FINISH_ABORT = "abort"    # the worker gave the request up (it was cancelled or stopping)
FINISH_ERROR = "error"    # the worker failed the request
# The worker did not finish the request: the router may retry it elsewhere.
WORKER_GAVE_UP = frozenset({FINISH_ABORT, FINISH_ERROR})
