"""Where many independent pieces of model work run: here, in local processes, or on Ray.

`dpl batch` and `dpl bench` hand any executor the same two things: a module-level function
`work(model, task) -> result` and a list of tasks. Every worker loads the model once (`ModelSpec`)
and keeps it for all its tasks; results come back to this process as they finish, and only this
process writes files, so an output folder has one writer however the work is spread. Tasks and
results travel by pickle between our own processes (multiprocessing's or Ray's transport); what
reaches the disk is written by the callers, as JSON, PNG and safetensors.

A task's own failure is the work function's business (the batch records it and goes on); an
error raised out of `map` means the machinery broke (a worker process died), and the callers
stop, keeping what was already written, so a rerun resumes.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from types import TracebackType
from typing import Any, TypeVar

from dpl_edit.engine.model import LoadedModel, available_cores, load_model
from dpl_edit.errors import DplError

Task = TypeVar("Task")
Result = TypeVar("Result")
Work = Callable[[LoadedModel, Task], Result]

RAY_INSTALL = "pip install 'dpl-edit[ray]'"


@dataclass(frozen=True)
class ModelSpec:
    """How a worker loads the model: what `load_model` takes (a path every worker can read)."""

    path: str | None
    device: str = "cpu"
    dtype: str = "float32"
    cuda_graphs: bool = False
    channels_last: bool = False
    variant: str | None = None

    def load(self) -> LoadedModel:
        return load_model(
            self.path,
            device=self.device,
            dtype=self.dtype,
            cuda_graphs=self.cuda_graphs,
            channels_last=self.channels_last,
            variant=self.variant,
        )


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """Each of `workers` processes gets an equal share of the cores: N workers each using
    every core would oversubscribe the machine N times and run slower than one."""
    return max(1, (cores or available_cores()) // max(1, workers))


class Executor(ABC):
    """Runs `work` over tasks; `map` yields (task index, result) in order of completion."""

    workers: int

    @abstractmethod
    def map(self, work: Work, tasks: Sequence[Any]) -> Iterator[tuple[int, Any]]: ...

    @abstractmethod
    def close(self) -> None:
        """Release the workers (and their models)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class Sequential(Executor):
    """Everything in this process, on a model it already holds, in task order."""

    def __init__(self, model: LoadedModel):
        self.model, self.workers = model, 1

    def map(self, work: Work, tasks: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        for index, task in enumerate(tasks):
            yield index, work(self.model, task)

    def close(self) -> None:
        """Nothing to release: the model belongs to the caller."""


_WORKER_MODEL: LoadedModel | None = None
"""The model of a local worker process, loaded once by `_start_worker`."""


def _start_worker(spec: ModelSpec, threads: int) -> None:
    import torch

    global _WORKER_MODEL
    torch.set_num_threads(threads)
    _WORKER_MODEL = spec.load()


def _in_worker(work: Work, task: Any) -> Any:
    assert _WORKER_MODEL is not None, "worker started without its model"
    return work(_WORKER_MODEL, task)


class ProcessPool(Executor):
    """`workers` local processes (spawned, so no state is shared by forking a loaded torch),
    each loading the model once and using `threads` threads (default: its share of the cores).

    Results are bit-identical to a run in one process with as many threads; with another
    thread count, float sums are ordered differently and a few pixels may differ by one level.
    """

    def __init__(self, spec: ModelSpec, workers: int, threads: int | None = None):
        if workers < 2:
            raise DplError(f"a process pool needs at least 2 workers, got {workers}")
        self.workers = workers
        self.threads = threads or threads_per_worker(workers)
        self.pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=get_context("spawn"),
            initializer=_start_worker,
            initargs=(spec, self.threads),
        )

    def map(self, work: Work, tasks: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        futures: dict[Future, int] = {
            self.pool.submit(_in_worker, work, task): index for index, task in enumerate(tasks)
        }
        try:
            while futures:
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                for future in done:
                    yield futures.pop(future), future.result()
        finally:
            for future in futures:
                future.cancel()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _ActorWorker:
    """A Ray actor's state: the model, loaded once, with its share of the node's cores."""

    def __init__(self, spec: ModelSpec, threads: int):
        _start_worker(spec, threads)

    def run(self, work: Work, task: Any) -> Any:
        return _in_worker(work, task)


def require_ray() -> Any:
    """The `ray` module, or a one-line error saying how to install it (it is an extra)."""
    try:
        import ray
    except ImportError:
        raise DplError(f"--ray needs Ray, which is not installed: {RAY_INSTALL}") from None
    return ray


class RayActors(Executor):
    """Ray actors on a cluster, each holding the model; a task goes to whichever is free.

    `address` is what `ray.init` takes: "auto" (the cluster this machine belongs to), "local"
    (start a private instance) or HOST:PORT. When this process is already connected (a test's
    `ray.init`), that connection is used. `workers` actors are started (default: as many as the
    cluster's GPUs allow at `gpus_per_job` each, else one per CPU); `gpus_per_job` defaults to 1
    on a cluster with GPUs, 0 without. The cluster's CPUs are shared out between the actors.
    """

    def __init__(
        self,
        spec: ModelSpec,
        address: str,
        workers: int | None = None,
        gpus_per_job: float | None = None,
    ):
        ray = self.ray = require_ray()
        self.started = not ray.is_initialized()
        if self.started:
            try:
                ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise DplError(f"cannot connect to Ray at '{address}': {first}") from None
        resources = ray.cluster_resources()
        cpus, gpus = float(resources.get("CPU", 1)), float(resources.get("GPU", 0))
        if gpus_per_job is None:
            gpus_per_job = 1.0 if gpus else 0.0
        if gpus_per_job > gpus:
            self.close()
            raise DplError(f"--gpus-per-job {gpus_per_job:g}, but the cluster has {gpus:g} GPUs")
        if workers is None:
            workers = int(gpus // gpus_per_job) if gpus_per_job else int(cpus)
        self.workers = max(1, workers)
        cpus_each = cpus / self.workers
        actor = ray.remote(_ActorWorker)
        self.actors = [
            actor.options(num_cpus=cpus_each, num_gpus=gpus_per_job).remote(
                spec, max(1, int(cpus_each))
            )
            for _ in range(self.workers)
        ]

    def map(self, work: Work, tasks: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        ray = self.ray
        queue = iter(enumerate(tasks))
        running: dict[Any, tuple[int, Any]] = {}

        def give(actor: Any) -> None:
            item = next(queue, None)
            if item is not None:
                running[actor.run.remote(work, item[1])] = (item[0], actor)

        for actor in self.actors:  # one task per actor: a free actor takes the next one
            give(actor)
        while running:
            (ref,), _ = ray.wait(list(running), num_returns=1)
            index, actor = running.pop(ref)
            result = ray.get(ref)
            give(actor)
            yield index, result

    def close(self) -> None:
        for actor in getattr(self, "actors", []):
            self.ray.kill(actor)
        if self.started:
            self.ray.shutdown()


def make_executor(
    model: LoadedModel,
    spec: ModelSpec,
    workers: int | None = None,
    ray_address: str | None = None,
    gpus_per_job: float | None = None,
) -> Executor:
    """The executor the options ask for: Ray when given an address (`workers` actors, default
    as many as the cluster holds), local processes for more than one worker, else this
    process on `model`."""
    if workers is not None and workers < 1:
        raise DplError(f"--workers must be at least 1, got {workers}")
    if gpus_per_job is not None and ray_address is None:
        raise DplError("--gpus-per-job needs --ray")
    if ray_address is not None:
        return RayActors(spec, ray_address, workers, gpus_per_job)
    if workers is not None and workers > 1:
        return ProcessPool(spec, workers)
    return Sequential(model)
