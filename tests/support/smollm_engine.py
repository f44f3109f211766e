"""The real SmolLM2-135M engine as integration tests use it, and checks on it."""

from __future__ import annotations

from collections.abc import Iterator

from core.config import EngineConfig
from workers.engine.async_engine import AsyncEngine


def smollm2_engine(worker_id: str, kv_cache_mb: int = 128) -> Iterator[AsyncEngine]:
    """Body of a module-scoped fixture: one float32 engine, shut down afterwards."""
    # float32: in bf16 SmolLM2's first answer token to the Paris question is a near-tie
    # ("The" -0.07 below "L"), which rounding can flip; fp32 matches transformers.
    eng = AsyncEngine(EngineConfig(dtype="float32", kv_cache_bytes=kv_cache_mb * 2**20,
                                   max_model_len=2048, torch_threads=2), worker_id=worker_id)
    yield eng
    eng.shutdown()


def chat_ids(engine: AsyncEngine, text: str, system: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}]
    return engine.tokenizer.encode_chat(messages)


def assert_no_leaked_blocks(engine: AsyncEngine) -> None:
    load = engine.load()
    assert load.running == 0 and load.waiting == 0
    assert load.kv_blocks_used == 0, "every block must be back in the free pool"
    engine.engine.scheduler.check_integrity()
