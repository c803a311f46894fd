"""Fixtures shared by every test tier."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def smollm2_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The embedded default model (SmolLM2-135M-Instruct) as an HF folder, converted once per session.

    Converts into ``$BRAID_CACHE`` when it is set (so later sessions reuse it), else into a
    session temp folder.
    """
    import torch

    from braid.runtime.model_source import resolve_model_path

    torch.set_num_threads(1)
    cache = os.environ.get("BRAID_CACHE") or str(tmp_path_factory.mktemp("braid_cache"))
    return resolve_model_path(None, cache_dir=cache)


def assert_at_rest(engine) -> None:
    """The pool invariant, read on the scheduler thread: with nothing running, every KV slot is
    free or evictable from the radix cache, and no request row is held."""
    # a shut-down engine's scheduler thread has stopped: read its state directly
    stats = engine.scheduler.stats_snapshot() if engine._closed else engine.get_stats()
    assert stats["running"] == 0 and stats["waiting"] == 0, stats
    assert stats["at_rest_error"] is None, stats["at_rest_error"]
    assert stats["free_slots"] + stats["evictable_slots"] == stats["pool_slots"], stats


@pytest.fixture
def make_engine():
    """Build engines for one test; at teardown each must be at rest, then it is shut down."""
    import braid as bd

    engines = []

    def build(model_path: str, **kwargs):
        kwargs.setdefault("max_total_tokens", 4096)
        kwargs.setdefault("cpu_threads", 1)
        eng = bd.Engine(model_path=model_path, **kwargs)
        engines.append(eng)
        return eng

    yield build
    try:
        for eng in engines:
            assert_at_rest(eng)
    finally:
        for eng in engines:
            eng.shutdown()
