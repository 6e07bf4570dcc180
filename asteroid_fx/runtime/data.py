"""A job's data the way a pipeline reads it: per iteration, only the rows a device's actions use.

Iteration i of a run is batch ``i % steps_per_epoch`` of epoch ``i // steps_per_epoch``: the
dataset's indices in a shuffle seeded by (run seed, epoch), which every process computes alike,
cut into batches of ``batch`` rows; the last partial one is dropped, or with ``Job.last_batch`` =
"smaller" is the epoch's last batch, of fewer rows (``Batches.rows_at``). Row r of the batch is sample
``order[k * batch + r]``. A device reads the rows its F actions name, and only what they need:
the inputs where it runs the first stage, the labels where it runs the last (``needed_rows``).
A recovery that redoes iteration i reads iteration i's rows again, whatever devices run them.

What a device loads for an iteration is a ``Rows`` view per input and one for the labels: the
rows it needs stacked in row order, sliced by the batch's row numbers as the backends slice a
whole batch (``t[lo:hi]``). ``Loader`` loads the next iteration's rows in a background thread
while the current one trains.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, Callable, Sequence

import torch

from asteroid_fx.ir.errors import InputError
from asteroid_fx.ir.program import Action, Op

Spans = tuple[tuple[int, int], ...]  # sorted, disjoint [lo, hi) row ranges of one batch

EPOCH_SEED_STRIDE = 1_000_003


def needed_rows(actions: Sequence[Action], microbatch_rows: int, last_stage: int) -> tuple[Spans, Spans]:
    """The batch rows whose inputs (F of stage 0) and whose labels (F of ``last_stage``) the
    actions read, as merged spans."""
    inputs, labels = [], []
    for a in actions:
        if a.op != Op.F:
            continue
        span = (a.mb * microbatch_rows + a.rows[0], a.mb * microbatch_rows + a.rows[1])
        if a.stage == 0:
            inputs.append(span)
        if a.stage == last_stage:
            labels.append(span)
    return merge(inputs), merge(labels)


def merge(spans: Sequence[tuple[int, int]]) -> Spans:
    out: list[list[int]] = []
    for lo, hi in sorted(spans):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def rows_of(spans: Spans) -> list[int]:
    return [r for lo, hi in spans for r in range(lo, hi)]


class Rows:
    """Some rows of one batch-first value (a tensor, or a tuple/list/dict of them), stacked in row
    order: ``rows[lo:hi]`` is batch rows lo..hi-1, which must lie in one of the loaded spans."""

    def __init__(self, spans: Spans, value: Any):
        self.spans, self.value = spans, value
        self._starts, at = [], 0
        for lo, hi in spans:
            self._starts.append(at)
            at += hi - lo

    def __getitem__(self, rows: slice) -> Any:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("Rows are read by a slice of batch rows")
        lo, hi = rows.start or 0, rows.stop
        for (a, b), start in zip(self.spans, self._starts):
            if a <= lo and hi <= b:
                return _slice(self.value, slice(start + lo - a, start + hi - a))
        raise IndexError(f"rows {lo}:{hi} of the batch were not loaded on this device (it loaded {list(self.spans)}); "
                         "its actions read rows it did not announce")


def _slice(value: Any, sl: slice) -> Any:
    if isinstance(value, torch.Tensor):
        return value[sl]
    if isinstance(value, dict):
        return {k: _slice(v, sl) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_slice(v, sl) for v in value)
    raise InputError(f"a batch value of type {type(value).__name__} cannot be cut into rows; labels and inputs "
                     "must be tensors, or tuples, lists or dicts of them")


class Batches:
    """Which samples make up iteration i's batch, and loading the rows of it a device needs.
    ``flatten``: collated inputs (a tensor, tuple or dict) -> the model's positional inputs, the
    order the captured graph takes them in."""

    def __init__(self, job, *, seed: int, flatten: Callable[[Any], tuple[torch.Tensor, ...]] | None = None,
                 validation: bool = False):
        self.job, self.seed = job, seed
        self.dataset = job.validation if validation else job.dataset
        self.labels = job.validation_labels if validation else job.labels
        self.shuffle = job.shuffle and not validation
        self.collate = job.collate or torch.utils.data.default_collate
        self.flatten = flatten or _positional
        self.batch = job.batch
        # the validation set is read by sample (``rows``), never by iteration
        self.steps_per_epoch = job.steps_per_epoch if not validation else len(self.dataset) // self.batch
        self._order: tuple[int, torch.Tensor] | None = None

    def indices(self, iteration: int) -> torch.Tensor:
        """The dataset indices of iteration ``iteration``'s rows, in row order."""
        epoch, k = divmod(iteration, self.steps_per_epoch)
        if self._order is None or self._order[0] != epoch:
            n = len(self.dataset)
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * EPOCH_SEED_STRIDE + epoch)
                order = torch.randperm(n, generator=g)
            else:
                order = torch.arange(n)
            self._order = (epoch, order)
        return self._order[1][k * self.batch:(k + 1) * self.batch]

    def rows_at(self, iteration: int) -> int:
        """Rows of iteration ``iteration``'s batch: ``batch``, or the smaller last batch's (``Job.rows_at``)."""
        return self.job.rows_at(iteration)

    def load(self, iteration: int, input_rows: Spans, label_rows: Spans) -> tuple[tuple[Any, ...], Any]:
        """Iteration ``iteration``'s inputs at ``input_rows`` (a ``Rows`` per positional input) and
        labels at ``label_rows`` (``Rows``, or None where none are needed)."""
        index = self.indices(iteration)
        inputs: tuple[Any, ...] = ()
        labels = None
        if self.labels is not None:
            if input_rows:
                flat = self.flatten(self._collate([self._get(self.dataset, int(index[r])) for r in rows_of(input_rows)]))
                inputs = tuple(Rows(input_rows, t) for t in flat)
            if label_rows:
                labels = Rows(label_rows, self._collate([self._get(self.labels, int(index[r]))
                                                         for r in rows_of(label_rows)]))
            return inputs, labels
        wanted = sorted(set(rows_of(input_rows)) | set(rows_of(label_rows)))
        samples = {r: self._pair(int(index[r])) for r in wanted}
        if input_rows:
            flat = self.flatten(self._collate([samples[r][0] for r in rows_of(input_rows)]))
            inputs = tuple(Rows(input_rows, t) for t in flat)
        if label_rows:
            labels = Rows(label_rows, self._collate([samples[r][1] for r in rows_of(label_rows)]))
        return inputs, labels

    def rows(self, indices) -> tuple[tuple[torch.Tensor, ...], Any]:
        """Dataset samples ``indices`` (in that order, no shuffle) as one batch: (inputs, labels)."""
        indices = list(indices)
        if self.labels is not None:
            xs = [self._get(self.dataset, i) for i in indices]
            ys = [self._get(self.labels, i) for i in indices]
        else:
            xs, ys = zip(*(self._pair(i) for i in indices)) if indices else ((), ())
        return tuple(self.flatten(self._collate(list(xs)))), self._collate(list(ys))

    def whole(self, iteration: int) -> tuple[tuple[torch.Tensor, ...], Any]:
        """The whole batch of ``iteration`` as plain tensors (the local backend, eager references)."""
        every = ((0, self.rows_at(iteration)),)
        inputs, labels = self.load(iteration, every, every)
        return tuple(r.value for r in inputs), labels.value

    def _get(self, data, i: int) -> Any:
        try:
            return data[i]
        except Exception as e:
            raise InputError(f"reading sample {i} of the job's {'labels' if data is self.labels else 'dataset'} "
                             f"failed ({type(e).__name__}: {e})") from e

    def _pair(self, i: int) -> tuple[Any, Any]:
        sample = self._get(self.dataset, i)
        if not isinstance(sample, (tuple, list)) or len(sample) != 2:
            raise InputError(f"sample {i} of the job's dataset is a {type(sample).__name__}"
                             f"{f' of {len(sample)}' if isinstance(sample, (tuple, list)) else ''}, not an "
                             "(inputs, label) pair; return (inputs, label) from __getitem__, or give the labels "
                             "apart as Job.labels and only the inputs from the dataset")
        return sample[0], sample[1]

    def _collate(self, items: list) -> Any:
        try:
            return self.collate(items)
        except Exception as e:
            raise InputError(f"the job's samples do not stack into a batch ({type(e).__name__}: {e}); every sample "
                             "must have the same shapes, or give Job.collate") from e


def _positional(inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs)
    raise InputError(f"inputs of type {type(inputs).__name__}: give a tensor or a tuple of tensors per sample "
                     "(a dict of keyword inputs needs the compiled model's input order)")


class Loader:
    """A device's rows, iteration after iteration, loaded ahead while it trains: ``get(i,
    input_rows, label_rows)`` returns what ``Batches.load`` does. With ``workers`` = 0 the next
    iteration's rows load in a background thread; with ``workers`` > 0 a torch DataLoader's worker
    processes load whole iterations ahead (``prefetch`` each), for datasets whose reads cost CPU
    (decoding, augmentation). A prefetch made for other rows (the device's actions changed in a
    recovery or a switch) is dropped and loading starts again from the iteration asked for."""

    def __init__(self, batches: Batches, *, iterations: int | None = None, prefetch: bool = True,
                 workers: int = 0):
        self.batches, self.iterations, self.workers = batches, iterations, workers
        self._pool = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="asteroid-data")
                      if prefetch and not workers else None)
        self._ahead: tuple[tuple, concurrent.futures.Future] | None = None
        self._stream: tuple[tuple, int, Any] | None = None  # (rows, next iteration, DataLoader iterator)

    def get(self, iteration: int, input_rows: Spans, label_rows: Spans) -> tuple[tuple[Any, ...], Any]:
        if self.workers:
            return self._from_stream(iteration, (input_rows, label_rows))
        key = (iteration, input_rows, label_rows)
        if self._ahead is not None and self._ahead[0] == key:
            got = self._ahead[1].result()
        else:
            got = self.batches.load(iteration, input_rows, label_rows)
        self._ahead = None
        more = self.iterations is None or iteration + 1 < self.iterations
        if self._pool is not None and more and (input_rows or label_rows):
            nxt = (iteration + 1, input_rows, label_rows)
            self._ahead = (nxt, self._pool.submit(self.batches.load, *nxt))
        return got

    def _from_stream(self, iteration: int, rows: tuple[Spans, Spans]) -> tuple[tuple[Any, ...], Any]:
        if not (rows[0] or rows[1]):
            return (), None
        if self._stream is None or self._stream[0] != rows or self._stream[1] != iteration:
            end = self.iterations if self.iterations is not None else iteration + 1_000_000
            loader = torch.utils.data.DataLoader(_Iterations(self.batches, rows), batch_size=None,
                                                 sampler=range(iteration, end), num_workers=self.workers,
                                                 collate_fn=_as_is, prefetch_factor=2)
            self._stream = (rows, iteration, iter(loader))
        got = next(self._stream[2])
        self._stream = (rows, iteration + 1, self._stream[2])
        return got

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._stream = None  # the DataLoader's workers stop with their iterator


class _Iterations(torch.utils.data.Dataset):
    """Item i: iteration i's rows of a device, loaded (what a DataLoader worker process computes)."""

    def __init__(self, batches: Batches, rows: tuple[Spans, Spans]):
        self.batches, self.rows = batches, rows

    def __getitem__(self, iteration: int):
        return self.batches.load(iteration, *self.rows)


def _as_is(x):
    return x
