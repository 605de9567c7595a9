"""Ray: the callable class for `Dataset.map_batches`, and the target `nerserve tag --ray` runs on.

`NerTagger` is what a Ray Data user calls on data already in Ray:

    ds = ray.data.read_parquet("s3://bucket/docs/")
    tagged = ds.map_batches(NerTagger, fn_constructor_kwargs={"checkpoint": "dslim/bert-base-NER-uncased"},
                            batch_format="pyarrow", batch_size=256, concurrency=4, num_gpus=1)

Each actor loads one engine; each batch comes back with two more columns of a fixed Arrow type,
`entities` (what /predict_tokens returns per text, outputs.entities_type) and `error` (null, or the
row's error), so a bad row is a row and never fails the job.

`RayTarget` is the command's way: `ray.init(ADDRESS)` (a local cluster without one), `--concurrency`
actors of the same class (a GPU each with `--num-gpus`), this package shipped to the cluster's workers
as a runtime-env module. The command's own reader feeds them and its writer keeps order and resume,
so the job streams, and a rerun continues where a kill stopped it. Ray is an optional extra
(the `ray` extra, requirements-ray.txt)."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

from .local_target import LocalEngine, checkpoint_setting
from .outputs import entities_type
from .rows import MISSING_TEXT, NOT_A_STRING, Outcome, RequestOptions, Unreachable, row_error


class NerTagger:
    """`ds.map_batches(NerTagger, fn_constructor_kwargs={...}, batch_format="pyarrow", concurrency=N)`:
    adds `entities` and `error` columns to each batch."""

    def __init__(
        self,
        checkpoint: str | None = None,
        engine: str | None = None,
        text_column: str = "text",
        aggregation_strategy: str = "max",
        truncate: bool = False,
        truncation_direction: str = "right",
    ) -> None:
        options = RequestOptions(aggregation_strategy.lower(), truncate, truncation_direction.lower())
        self.engine = LocalEngine(checkpoint, engine, options)
        self.text_column = text_column

    def answer(self, texts: list[Any]) -> list[Outcome]:
        """One outcome per value: the entities of each text, a row error for a missing or non-string one."""
        outcomes: list[Outcome | None] = [None] * len(texts)
        good = []
        for i, text in enumerate(texts):
            if text is None:
                outcomes[i] = row_error(MISSING_TEXT, f"no {self.text_column!r}")
            elif not isinstance(text, str):
                outcomes[i] = row_error(NOT_A_STRING, f"{self.text_column!r} is {type(text).__name__}, not a string")
            else:
                good.append(i)
        if good:
            for i, outcome in zip(good, self.engine.answer([texts[i] for i in good]), strict=True):
                outcomes[i] = outcome
        return [outcome for outcome in outcomes if outcome is not None]

    def model(self) -> dict[str, Any]:
        return self.engine.model()

    def info(self) -> dict[str, Any]:
        return self.engine.info()

    def __call__(self, batch: Any) -> Any:
        """A pyarrow Table (or a dict of columns) in, the same rows with `entities` and `error` out."""
        import pyarrow as pa

        table = batch if isinstance(batch, pa.Table) else pa.table(batch)
        outcomes = self.answer(table.column(self.text_column).to_pylist())
        entities = pa.array([None if isinstance(o, str) else o for o in outcomes], entities_type())
        errors = pa.array([o if isinstance(o, str) else None for o in outcomes], pa.string())
        return table.append_column("entities", entities).append_column("error", errors)


class RayTarget:
    """`--concurrency` NerTagger actors, two requests queued at each so none waits for its next one."""

    def __init__(
        self,
        address: str | None,
        actors: int,
        num_gpus: float,
        checkpoint: str | None,
        engine: str | None,
        options: RequestOptions,
    ) -> None:
        import ray

        package = Path(__file__).resolve().parent.parent  # nerserve, shipped to the cluster's workers
        runtime_env = {"py_modules": [str(package)]}
        if address:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        else:
            ray.init(runtime_env=runtime_env, include_dashboard=False, log_to_driver=False)
        self.ray = ray
        actor = ray.remote(num_gpus=num_gpus)(NerTagger) if num_gpus else ray.remote(NerTagger)
        kwargs = {
            "checkpoint": checkpoint_setting(checkpoint),
            "engine": engine,
            "aggregation_strategy": options.aggregation_strategy,
            "truncate": options.truncate,
            "truncation_direction": options.truncation_direction,
        }
        self.actors: list[Any] = [actor.remote(**kwargs) for _ in range(actors)]
        self.window = 2 * actors
        self.retries: Counter[str] = Counter()
        self.idle: asyncio.Queue[Any] | None = None

    async def _call(self, method: str, *args: Any) -> Any:
        if self.idle is None:  # made in the runner's event loop
            self.idle = asyncio.Queue()
            for actor in self.actors * 2:
                self.idle.put_nowait(actor)
        actor = await self.idle.get()
        try:
            return await getattr(actor, method).remote(*args)
        except self.ray.exceptions.RayError as error:
            raise Unreachable(f"a Ray actor failed: {type(error).__name__}: {str(error)[:500]}") from None
        finally:
            self.idle.put_nowait(actor)

    async def model(self) -> dict[str, Any]:
        return await self._call("model")

    async def info(self) -> dict[str, Any]:
        return await self._call("info")

    async def answer(self, texts: list[str]) -> list[Outcome]:
        return await self._call("answer", texts)

    async def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.ray.shutdown()
