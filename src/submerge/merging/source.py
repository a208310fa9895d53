"""Where the merge rules read task vectors from: one parameter of every task vector at a time.

Every merge rule takes ``task_vectors``: either a sequence of state dicts (in memory, the CLI
and the tests) or a :class:`TaskVectorSource`, which hands out one parameter of all ``T`` task
vectors at a time (:meth:`TaskVectorSource.read`). The rules walk the keys in sorted order and
keep only what they accumulate (the merged task vector, TIES' int8 elected signs). A source that
reads from files (:class:`submerge.io.hdf5.TaskVectorFiles`) hands out a key as
:class:`KeyTensors`, a sequence that reads task ``t``'s tensor when it is accessed and keeps
only the first and the last one read; the per-parameter code walks it in task order (twice
where the rule needs two passes, e.g. a sum and then per-task masks), so the merge's memory is
about one model plus a few parameters, flat in ``T``. Both kinds run the same per-parameter
code, so the results are bitwise the same.

A source also knows each key's shape and dtype without reading data (:meth:`meta`), and may
know TIES' per-task trim thresholds (:meth:`ties_thresholds`, recorded when the task vector
was extracted).
"""

from __future__ import annotations

from collections.abc import Mapping as MappingABC
from collections.abc import Sequence as SequenceABC
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["TaskVectorSource", "InMemorySource", "KeyTensors", "as_source", "map_keys"]


class TaskVectorSource:
    """``T`` task vectors with identical float keys, shapes and dtypes, read key by key.

    Subclasses set ``keys`` (sorted) and implement :meth:`meta`, :meth:`read_one` and
    :meth:`__len__` (and :meth:`read` where they hold the tensors anyway)."""

    keys: list[str]
    progress: bool = False  # show a progress bar over the keys (long reads from files)

    def __len__(self) -> int:
        raise NotImplementedError

    def meta(self, key: str) -> tuple[torch.Size, torch.dtype]:
        """``(shape, dtype)`` of ``key`` (the same in every task vector), reading no data."""
        raise NotImplementedError

    def read(self, key: str) -> Sequence[Tensor]:
        """``key`` of every task vector, in task order (by default a :class:`KeyTensors`,
        read on access)."""
        return KeyTensors(self, key)

    def read_one(self, index: int, key: str) -> Tensor:
        """``key`` of task vector ``index``."""
        raise NotImplementedError

    def ties_thresholds(self, k: float) -> list[Tensor | None] | None:
        """Per task, TIES' trim threshold for top-``k`` % where it is known without reading
        the task vectors (recorded at extraction); ``None`` when it must be computed."""
        return None

    def __getitem__(self, index: int) -> Mapping[str, Tensor]:
        """Task vector ``index`` as a read-on-access mapping, so that a merge rule written for a
        list of state dicts also runs on a source (each access reads the key again)."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        return _LazyTaskVector(self, index)

    def __iter__(self) -> Iterator[Mapping[str, Tensor]]:
        return (self[i] for i in range(len(self)))

    def iter_keys(self, desc: str) -> Iterator[str]:
        """The keys in sorted order, with a progress bar for sources that read files."""
        if not self.progress:
            return iter(self.keys)
        from tqdm import tqdm

        return iter(tqdm(self.keys, desc=desc, unit="param", mininterval=5, leave=False))


class KeyTensors(SequenceABC):
    """One parameter of every task vector of a source, read on access (``len`` = number of
    tasks; slices are views). It keeps the first task's tensor (shapes and dtypes are asked of
    it) and the last one read, so walking it in task order reads each tensor once and holds at
    most two; any other access reads the file again. Use ``list(...)`` where a computation
    needs all ``T`` tensors at once."""

    def __init__(self, source: TaskVectorSource, key: str, indices: range | None = None,
                 cache: dict | None = None):
        self._source, self._key = source, key
        self._indices = range(len(source)) if indices is None else indices
        self._cache = {} if cache is None else cache  # task index -> tensor (first and last)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return KeyTensors(self._source, self._key, self._indices[i], self._cache)
        index = self._indices[i]
        tensor = self._cache.get(index)
        if tensor is None:
            tensor = self._source.read_one(index, self._key)
            first = self._cache.get(0)
            self._cache.clear()
            if first is not None:
                self._cache[0] = first
            self._cache[index] = tensor
        return tensor

    def __iter__(self) -> Iterator[Tensor]:
        return (self[i] for i in range(len(self)))


class _LazyTaskVector(MappingABC):
    """One task vector of a source; ``tv[key]`` reads the key."""

    def __init__(self, source: TaskVectorSource, index: int):
        self._source, self._index = source, index

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._source.keys:
            raise KeyError(key)
        return self._source.read_one(self._index, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._source.keys)

    def __len__(self) -> int:
        return len(self._source.keys)


class InMemorySource(TaskVectorSource):
    """A list of task-vector state dicts (checked by
    :func:`submerge.merging.task_vectors.check_task_vectors`)."""

    def __init__(self, task_vectors: Sequence[Mapping[str, Tensor]]):
        from submerge.merging.task_vectors import check_task_vectors

        self.keys = check_task_vectors(task_vectors)
        self.task_vectors = list(task_vectors)

    def __len__(self) -> int:
        return len(self.task_vectors)

    def meta(self, key: str) -> tuple[torch.Size, torch.dtype]:
        t = self.task_vectors[0][key]
        return t.shape, t.dtype

    def read(self, key: str) -> list[Tensor]:
        return [tv[key] for tv in self.task_vectors]

    def read_one(self, index: int, key: str) -> Tensor:
        return self.task_vectors[index][key]

    def __getitem__(self, index: int) -> Mapping[str, Tensor]:
        return self.task_vectors[index]


@torch.no_grad()
def map_keys(task_vectors: Sequence[Mapping[str, Tensor]] | TaskVectorSource, desc: str,
             fn: Callable[[Sequence[Tensor]], Tensor]) -> Iterator[tuple[str, Tensor]]:
    """``(key, fn(tensors of key))`` for every key in sorted order: a rule that merges each
    parameter on its own, one key at a time (``desc``: its progress bar's label)."""
    src = as_source(task_vectors)
    for key in src.iter_keys(desc):
        yield key, fn(src.read(key))


def as_source(task_vectors: Sequence[Mapping[str, Tensor]] | TaskVectorSource) -> TaskVectorSource:
    """``task_vectors`` as a source (a list of state dicts is checked and wrapped)."""
    if isinstance(task_vectors, TaskVectorSource):
        if len(task_vectors) == 0:
            raise ValueError("no task vectors given: need at least one expert")
        return task_vectors
    return InMemorySource(task_vectors)
