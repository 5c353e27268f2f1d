"""Where the heavy work of a step runs: in the step's own process (the default, zero set-up) or on a Ray
cluster (``CURATION_RAY_ADDRESS``).

Dagster keeps orchestrating (partitions, lineage, retries, the UI); a step hands its per-shard and per-bucket
work to :meth:`ComputeResource.map` and writes what comes back, so every table is written by the step, one
writer per table, exactly as in-process. Model work goes through :meth:`ComputeResource.pool`: on Ray a pool of
actors, each loading the model once (and holding a GPU when one is asked for), fed shard by shard; in-process
one model in this process. Functions and actor classes must be importable on the cluster's workers (the
package installed in the cluster's image or environment) and read their inputs from paths every node sees.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import dagster as dg
from pydantic import Field

RAY_NAMESPACE = "curation"
_FORWARDED_ENV = ("CURATION_ROOT", "CURATION_SHARDS", "CURATION_CONFIG", "CURATION_MEMORY_GB", "CURATION_SHARD_GROUP",
                  "HF_HUB_OFFLINE", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                  "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ALLOW_HTTP")


class ComputeResource(dg.ConfigurableResource):
    """``ray_address`` None: everything runs in the step's process. Set (``ray://host:10001``, ``host:6379`` or
    ``auto``): per-shard work, dedup buckets and model inference run as Ray tasks and actors; each task is
    named ``curation:<stage>`` so the Ray dashboard shows what ran where. ``gpus_per_actor`` is what each model
    actor asks Ray for; None (the default) means one GPU when the model can use one and the cluster has
    GPUs, else none. ``actors`` caps how many model actors a step starts (default: one per shard, at most
    4)."""

    ray_address: Optional[str] = Field(default=None, description="Ray cluster address; None runs in-process")
    gpus_per_actor: Optional[float] = Field(default=None, description="GPUs each model actor asks Ray for "
                                                                      "(None: 1 for a GPU model on a GPU cluster)")
    cpus_per_task: float = Field(default=1.0, description="CPUs each per-shard or per-bucket task asks Ray for")
    actors: int = Field(default=4, description="most model actors one step starts")

    @property
    def on_ray(self) -> bool:
        return bool(self.ray_address)

    def parallelism(self) -> int:
        """How many tasks can run at once: 1 in-process, the cluster's CPUs (per task) on Ray."""
        if not self.on_ray:
            return 1
        return max(1, int(self._ray().cluster_resources().get("CPU", 1) // max(self.cpus_per_task, 1e-3)))

    def describe(self) -> str:
        return f"ray ({self.ray_address})" if self.on_ray else "in-process"

    def _ray(self):
        import ray

        if not ray.is_initialized():
            env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
            ray.init(address=self.ray_address, namespace=RAY_NAMESPACE, log_to_driver=False,
                     runtime_env={"env_vars": env} if env else None, configure_logging=False)
        return ray

    def map(self, fn: Callable[..., Any], items: Iterable[Any], stage: str, *args: Any) -> Iterator[Any]:
        """``fn(item, *args)`` for every item, results in the order of ``items``. On Ray each call is a task
        named ``curation:<stage>``, at most twice as many in flight as the cluster has CPUs."""
        items = list(items)
        if not self.on_ray:
            for item in items:
                yield fn(item, *args)
            return
        ray = self._ray()
        remote = ray.remote(_invoke).options(name=f"curation:{stage}", num_cpus=self.cpus_per_task, max_retries=2)
        shared = [ray.put(_Portable.of(a)) for a in args]
        window = max(2, 2 * self.parallelism())
        pending = [remote.remote(fn, item, *shared) for item in items[:window]]
        for i in range(len(items)):
            if i + window < len(items):
                pending.append(remote.remote(fn, items[i + window], *shared))
            yield ray.get(pending[i])
            pending[i] = None

    def actor_gpus(self, wants_gpu: bool, cluster_gpus: float) -> float:
        """The GPUs one model actor asks for: ``gpus_per_actor`` when set, else 1 for a model that can use a
        GPU on a cluster that has one, else 0."""
        if self.gpus_per_actor is not None:
            return float(self.gpus_per_actor)
        return 1.0 if wants_gpu and cluster_gpus >= 1 else 0.0

    def pool(self, factory: type, init: Sequence[Any], stage: str, n_items: int, wants_gpu: bool = False
             ) -> "ModelPool":
        """Workers built as ``factory(*init)`` (a class that loads a model in ``__init__``): one in this
        process, or up to ``actors`` Ray actors (one per item at most, no more than the cluster can place at
        once), each with :meth:`actor_gpus` GPUs."""
        if not self.on_ray:
            return ModelPool([factory(*init)], None, stage)
        ray = self._ray()
        have = ray.cluster_resources()
        gpus = self.actor_gpus(wants_gpu, have.get("GPU", 0))
        actor_cls = ray.remote(_Actor).options(num_gpus=gpus, num_cpus=self.cpus_per_task)
        fit = (have.get("GPU", 0) // gpus if gpus > 0 else have.get("CPU", 1) // max(self.cpus_per_task, 1e-3))
        n = max(1, min(self.actors, n_items, int(fit)))  # every actor must be placeable, or its items wait forever
        init = [_Portable.of(a) for a in init]
        return ModelPool([actor_cls.remote(factory, *init) for _ in range(n)], ray, stage)


class ModelPool:
    """Model workers; :meth:`map` sends items round-robin and yields results in order."""

    def __init__(self, workers: list, ray, stage: str):
        self._workers, self._ray, self._stage = workers, ray, stage

    def map(self, method: str, items: Iterable[Any]) -> Iterator[Any]:
        items = list(items)
        if self._ray is None:
            call = getattr(self._workers[0], method)
            for item in items:
                yield call(item)
            return
        n = len(self._workers)
        name = f"curation:{self._stage}"
        refs = [self._workers[i % n].call.options(name=name).remote(method, item)
                for i, item in enumerate(items[:2 * n])]
        for i in range(len(items)):
            if i + 2 * n < len(items):
                refs.append(self._workers[(i + 2 * n) % n].call.options(name=name).remote(method, items[i + 2 * n]))
            yield self._ray.get(refs[i])
            refs[i] = None

    def close(self) -> None:
        if self._ray is not None:
            for worker in self._workers:
                self._ray.kill(worker)
        self._workers = []


class _Portable:
    """A resource as its class and field values: a Dagster resource does not pickle (it carries its logger
    and config schema), so it travels to a Ray worker like this and is built again there."""

    def __init__(self, cls: type, fields: dict[str, Any]):
        self.cls, self.fields = cls, fields

    @classmethod
    def of(cls, value: Any) -> Any:
        if isinstance(value, dg.ConfigurableResource):
            return cls(type(value), {name: getattr(value, name) for name in type(value).model_fields})
        return value

    @staticmethod
    def build(value: Any) -> Any:
        return value.cls(**value.fields) if isinstance(value, _Portable) else value


def _invoke(fn: Callable[..., Any], item: Any, *args: Any) -> Any:
    """A Ray task: ``fn(item, *args)`` with the resources among ``args`` built again."""
    return fn(item, *[_Portable.build(a) for a in args])


class _Actor:
    """A Ray actor holding one ``factory(*init)`` (the model loads once, here)."""

    def __init__(self, factory: type, *init: Any):
        self.worker = factory(*[_Portable.build(a) for a in init])

    def call(self, method: str, item: Any) -> Any:
        return getattr(self.worker, method)(item)


def compute_from_env() -> ComputeResource:
    """``CURATION_RAY_ADDRESS`` (a ``RAY_ADDRESS`` set for other tools does not move this pipeline onto a
    cluster by itself) and ``CURATION_RAY_GPUS_PER_ACTOR`` (unset: automatic, see ``gpus_per_actor``)."""
    gpus = os.environ.get("CURATION_RAY_GPUS_PER_ACTOR")
    try:
        gpus_per_actor = float(gpus) if gpus else None
    except ValueError:
        raise ValueError(f"CURATION_RAY_GPUS_PER_ACTOR must be a number of GPUs, got {gpus!r}") from None
    if gpus_per_actor is not None and gpus_per_actor < 0:
        raise ValueError(f"CURATION_RAY_GPUS_PER_ACTOR must not be negative, got {gpus!r}")
    return ComputeResource(ray_address=os.environ.get("CURATION_RAY_ADDRESS") or None, gpus_per_actor=gpus_per_actor)
