"""The one count of what a request used: the prompt, its cached part and the completion
tokens that reached the client. Everything reads it: the response's ``usage``, the stream's
usage chunk, the ledger row, the concurrency slot's token count and the cached-tokens metric.

When the prompt is billed: from the moment it is sent to a worker (``dispatch``), which
starts computing it at once; a client that leaves before the first token still used that
prefill. A worker that fails or refuses before its first delta (``withdraw``: retried
elsewhere, or an error response) bills nothing. Before the first delta the worker has not said how much of the
prompt was cached, so such a prompt is billed whole at the input price.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.pb.electron.v1 import worker_pb2 as pb
from core.protocol import WORKER_GAVE_UP


@dataclass
class Usage:
    """Counted as the deltas pass on their way to the client (``observe``); a retry on another
    worker starts it again (``start``). The prompt counts once over a request's n choices; the
    worker reports the cached part on each choice's last delta (the maximum is the same
    whether it reports it once or per choice); completion tokens add up."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    started: bool = False    # a worker's first delta arrived: the prompt was computed
    dispatched: bool = False  # the prompt was sent to a worker (which is computing it)
    choices_left: int = 0
    # Choices whose constrained output the max_tokens budget closed early (complete, "stop").
    forced_closes: int = 0

    def dispatch(self, prompt_tokens: int) -> None:
        """The prompt went to a worker: billed from now on, whatever happens next."""
        if not self.started:
            self.prompt_tokens, self.dispatched = prompt_tokens, True

    def withdraw(self) -> None:
        """The worker failed or refused before its first delta: nothing is billed."""
        if not self.started:
            self.dispatched = False

    def start(self, prompt_tokens: int, n: int) -> None:
        self.prompt_tokens, self.cached_tokens, self.completion_tokens = prompt_tokens, 0, 0
        self.started, self.choices_left, self.forced_closes = True, n, 0

    def observe(self, message: pb.GenerateResponse) -> None:
        self.completion_tokens += len(message.token_ids)
        if message.finish_reason and message.finish_reason not in WORKER_GAVE_UP:
            self.choices_left -= 1
            self.forced_closes += message.forced_close
            self.cached_tokens = min(self.prompt_tokens,
                                     max(self.cached_tokens, message.usage.cached_tokens))

    def unsent(self, completion_tokens: int) -> None:
        """Tokens counted on their way that never reached the client (the stream was cut
        while they waited to be written): not billed."""
        self.completion_tokens -= completion_tokens

    @property
    def finished(self) -> bool:
        """Every choice finished (stop or length)."""
        return self.started and self.choices_left <= 0

    @property
    def billed_prompt_tokens(self) -> int:
        """The prompt counts once it was sent to a worker (see the module's docstring)."""
        return self.prompt_tokens if self.started or self.dispatched else 0
