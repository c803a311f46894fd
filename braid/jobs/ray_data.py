"""``braid extract --ray``: the same job on Ray Data.

The documents become a Ray dataset; ``map_batches`` sends batches to a pool of actors that each
build one braid Engine (on a GPU when the cluster has them, else on CPUs) and run every document
of a batch through the same program and the same ``run_window`` as a local job. Each actor takes
two batches at once, so one batch's stragglers do not leave its engine idle. The records stream
back to the driver, which alone writes the output file: the exactly-once and resume guarantees
are those of a local job, and a killed driver takes its local Ray (and the documents in flight)
with it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from braid.errors import MissingPackageError
from braid.jobs.documents import Document
from braid.jobs.extract import DocumentResult, ExtractSettings, run_window

CALLS_PER_ACTOR = 2  # concurrent batches per actor; each brings half the window


class ExtractActor:
    """One Engine per actor; ``__call__`` runs a batch of documents and returns their results."""

    def __init__(self, settings: ExtractSettings, engine_args: dict[str, Any], window: int) -> None:
        from braid.jobs.extract import check_compiles
        from braid.lang.program import resolve_backend
        from braid.runtime.engine import Engine

        self.settings = settings
        self.window = window
        self.engine = Engine(**engine_args)
        self.backend = resolve_backend(self.engine)
        check_compiles(self.backend, settings)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        docs = [Document(str(k), str(t)) for k, t in zip(batch["key"], batch["text"])]
        results: list[DocumentResult] = []
        run_window(self.backend, self.settings, docs, self.window, results.append)
        return {"result": [json.dumps(vars(r), ensure_ascii=False) for r in results]}


def run_on_ray(settings: ExtractSettings, docs: Iterable[Document], engine_args: dict[str, Any],
               on_result: Callable[[DocumentResult], None], window: int, workers: int | None,
               address: str | None) -> None:
    try:
        import ray
        import ray.data
    except ImportError:
        raise MissingPackageError("braid extract --ray", 'pip install "braid[ray]"') from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the job has its own
    gpus = int(ray.cluster_resources().get("GPU", 0))
    workers = workers or max(1, gpus)
    per_call = max(1, window // CALLS_PER_ACTOR)
    items = [{"key": d.key, "text": d.text} for d in docs]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // per_call)))
    strategy = ray.data.ActorPoolStrategy(size=workers, max_concurrent_calls_per_actor=CALLS_PER_ACTOR,
                                          enable_true_multi_threading=True)
    mapped = dataset.map_batches(
        ExtractActor, fn_constructor_kwargs={"settings": settings, "engine_args": engine_args, "window": per_call},
        batch_size=per_call, compute=strategy, num_gpus=1 if gpus else 0, batch_format="numpy",
    )  # fmt: skip
    for batch in mapped.iter_batches(batch_size=None, batch_format="numpy"):
        for text in batch["result"]:
            on_result(DocumentResult(**json.loads(str(text))))
