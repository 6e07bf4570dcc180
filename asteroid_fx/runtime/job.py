"""A training job: the user's model, data, loss and optimizer, named by one importable entry.

Every process of a run (the launcher, each worker, a torchrun rank) imports the same entry,
``package.module:attribute``, and builds the same job from it: nothing of it is pickled or sent.
The attribute is a ``Job`` or a callable with no arguments returning one. A zoo name ("mlp",
"resnet18:small") is a job too (``zoo_job``): its model on generated samples.

What a job holds is what eager training needs (``Job``); the runtime adds the pipeline's side:
which rows of each iteration a device reads (runtime/data.py), the optimizer replicated per stage
(backends/state.OptimizerSettings), checkpoints (runtime/checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping, Sequence

import torch

from asteroid_fx.backends.state import OptimizerSettings
from asteroid_fx.ir.errors import InputError

# a zoo job's sample i is drawn under seed (run seed x this + i + 1)
ZOO_SEED_STRIDE = 100_003

# what Job.last_batch takes: leave an epoch's last partial batch out, or train it as a smaller batch
LAST_BATCH = ("drop", "smaller")


@dataclasses.dataclass
class Job:
    """One training job.

    ``model``: a callable with no arguments that builds the ``nn.Module`` (called with the run's
    seed set, so every process builds the same initial weights). ``dataset``: a map-style
    ``torch.utils.data.Dataset`` whose item ``i`` is ``(inputs, label)``, or only ``inputs`` when
    ``labels`` is given (any indexable of the labels, ``len(dataset)`` long): then the devices of
    the first stage read only ``dataset`` and those of the last stage only ``labels``. Inputs are
    a tensor, a tuple of tensors (positional inputs) or a dict of tensors (keyword inputs); each
    is one sample, without the batch dimension; ``collate`` (default
    ``torch.utils.data.default_collate``) stacks them into a batch. ``loss(outputs, labels)`` is
    a scalar mean over the rows it gets. ``batch``: rows per iteration (the global batch).
    ``example``: one global batch of inputs for capture; by default ``batch`` copies of sample 0.
    ``validation`` (and ``validation_labels``): a dataset evaluated at every checkpoint with the
    checkpoint's weights in the job's own model, in eval mode (runtime/evaluate.py);
    ``accuracy(outputs, labels)`` -> the number of correct rows (default: for integer labels,
    the argmax over the last dimension of tensor outputs). Optimizer: ``optimizer`` (a torch.optim class
    or its name), ``lr``, ``optimizer_kwargs``, ``no_decay`` (name patterns with weight decay 0),
    ``scheduler`` (optimizer -> LRScheduler, stepped per iteration), ``clip_grad_norm`` (the
    global norm over every stage). ``epochs`` over the dataset in a seeded shuffle
    (``shuffle``). ``last_batch``: what becomes of the ``len(dataset) mod batch`` rows an epoch
    leaves over: "drop" (the default) leaves them out, "smaller" trains them as the epoch's last
    iteration, a batch of those rows only, with the loss their mean (passes/remainder.py: the same
    stages and groups, fewer rows and maybe fewer micro-batches). ``loader_workers``: processes
    that load a device's rows ahead (a torch DataLoader's; 0: one background thread), for
    datasets whose reads cost CPU."""

    model: Callable[[], torch.nn.Module]
    dataset: Any
    loss: Callable
    batch: int
    labels: Any = None
    example: Any = None
    collate: Callable | None = None
    validation: Any = None
    validation_labels: Any = None
    accuracy: Callable | None = None
    optimizer: Any = "sgd"
    lr: float = 1e-3
    optimizer_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    no_decay: Sequence[str] = ()
    scheduler: Callable | None = None
    clip_grad_norm: float | None = None
    epochs: int = 1
    shuffle: bool = True
    loader_workers: int = 0
    last_batch: str = "drop"
    name: str = ""

    def __post_init__(self):
        if not callable(self.model) or isinstance(self.model, torch.nn.Module):
            raise InputError("Job.model must be a callable with no arguments that builds the model (every process "
                             "builds its own), not a module instance; e.g. model=lambda: MyNet()")
        if not callable(self.loss):
            raise InputError("Job.loss must be a callable loss(outputs, labels) -> scalar tensor")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise InputError(f"Job.batch={self.batch!r}: give the rows per iteration, a positive int")
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise InputError(f"Job.epochs={self.epochs!r}: give a positive int")
        for name, data in (("dataset", self.dataset), ("validation", self.validation)):
            if data is not None and not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
                raise InputError(f"Job.{name} must be a map-style torch.utils.data.Dataset (with __getitem__ and "
                                 f"__len__), got {type(data).__name__}")
        for name, data, of in (("labels", self.labels, self.dataset),
                               ("validation_labels", self.validation_labels, self.validation)):
            if data is not None and (of is None or len(data) != len(of)):
                raise InputError(f"Job.{name} has {len(data)} entries; it must have one per sample of the dataset "
                                 f"it labels ({len(of) if of is not None else 'none given'})")
        if len(self.dataset) < self.batch:
            raise InputError(f"the dataset has {len(self.dataset)} samples, fewer than one batch of {self.batch}; "
                             "use a smaller batch")
        if self.last_batch not in LAST_BATCH:
            raise InputError(f"Job.last_batch={self.last_batch!r}: give 'drop' (leave an epoch's last partial batch out) "
                             "or 'smaller' (train it as a smaller batch)")
        if not isinstance(self.loader_workers, int) or self.loader_workers < 0:
            raise InputError(f"Job.loader_workers={self.loader_workers!r}: give 0 (a background thread) or a number of "
                             "loader processes")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise InputError(f"Job.clip_grad_norm={self.clip_grad_norm!r}: give a positive norm, or None")
        self.settings  # a bad optimizer name fails here

    @property
    def settings(self) -> OptimizerSettings:
        return OptimizerSettings(self.optimizer, self.lr, dict(self.optimizer_kwargs), tuple(self.no_decay),
                                 self.scheduler)

    @property
    def remainder(self) -> int:
        """Rows of the smaller batch that ends every epoch (0: none, the last partial batch is
        dropped or there is none)."""
        return len(self.dataset) % self.batch if self.last_batch == "smaller" else 0

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.batch + (self.remainder > 0)

    def rows_at(self, iteration: int) -> int:
        """Rows of iteration ``iteration``'s batch: ``batch``, or ``remainder`` at an epoch's end."""
        last = iteration % self.steps_per_epoch == self.steps_per_epoch - 1
        return self.remainder if last and self.remainder else self.batch

    @property
    def iterations(self) -> int:
        return self.epochs * self.steps_per_epoch

    def with_optimizer(self, optimizer: str | None, lr: float | None) -> Job:
        """The job with its optimizer's name or learning rate replaced where given."""
        changes = {k: v for k, v in (("optimizer", optimizer), ("lr", lr)) if v is not None}
        return dataclasses.replace(self, **changes) if changes else self

    def with_last_batch(self, last_batch: str | None) -> Job:
        """The job with its ``last_batch`` choice replaced where given (checked: "drop" or "smaller")."""
        return dataclasses.replace(self, last_batch=last_batch) if last_batch not in (None, self.last_batch) else self


def load_job(entry: str, *, batch: int | None = None, iterations: int | None = None, seed: int = 0) -> Job:
    """The job named by ``entry``: a zoo name ("mlp", "mlp:small"; ``batch`` and ``iterations``
    size its generated data), or "package.module:attribute" (a Job, or a callable returning one)."""
    from asteroid_fx import models

    base, _, variant = entry.partition(":")
    if base in models.ZOO:
        if variant not in ("", "small"):
            raise InputError(f"model {entry!r}: the only variant of a zoo model is ':small'")
        return zoo_job(base, small=variant == "small", batch=batch or 32, iterations=iterations or 1, seed=seed)
    if not variant or not base:
        raise InputError(f"{entry!r} is neither a zoo model ({', '.join(models.ZOO)}; add ':small' for the test "
                         "config) nor a job entry 'package.module:attribute'")
    try:
        module = importlib.import_module(base)
    except Exception as e:  # an import error of the user's module, or of what it imports
        raise InputError(f"cannot import the job's module {base!r} ({type(e).__name__}: {e}); every process of the "
                         "run imports it, so it must be importable there (on sys.path / PYTHONPATH)") from e
    try:
        made = getattr(module, variant)
    except AttributeError:
        raise InputError(f"module {base!r} has no {variant!r}; the job entry is 'package.module:attribute'") from None
    if callable(made) and not isinstance(made, Job):
        try:
            made = made()
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"the job entry {entry!r} failed when called ({type(e).__name__}: {e})") from e
    if not isinstance(made, Job):
        raise InputError(f"{entry!r} gave a {type(made).__name__}, not an asteroid_fx Job; return "
                         "asteroid_fx.runtime.job.Job(model=..., dataset=..., loss=..., batch=...)")
    if batch is not None and batch != made.batch:
        made = dataclasses.replace(made, batch=batch)
    return made


def import_root(entry: str) -> str | None:
    """The folder a job entry's module is imported from (what a worker started elsewhere needs on
    its path), or None for a zoo name or a module without a file."""
    from pathlib import Path

    from asteroid_fx import models

    base = entry.partition(":")[0]
    if base in models.ZOO:
        return None
    module = importlib.import_module(base)
    path = getattr(module, "__file__", None)
    if path is None:
        return None
    root = Path(path).resolve().parent
    for _ in range(base.count(".") + (Path(path).name == "__init__.py")):
        root = root.parent
    return str(root)


class GeneratedSamples(torch.utils.data.Dataset):
    """A zoo model's generated samples: item i is drawn from the model's example and label
    generators under a seed of its own (the global random state is left as it was)."""

    def __init__(self, entry, small: bool, n: int, seed: int):
        self.entry, self.small, self.n, self.seed = entry, small, n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * ZOO_SEED_STRIDE + i + 1)
            inputs = tuple(t[0] for t in self.entry.example(1, self.small))
            label = self.entry.labels(1, self.small)[0]
        return (inputs[0] if len(inputs) == 1 else inputs), label


def zoo_job(name: str, *, small: bool = False, batch: int = 32, iterations: int = 1, seed: int = 0) -> Job:
    """A zoo model as a job: ``iterations`` batches of generated samples, in order (no shuffle),
    trained with SGD at lr 0.05 unless the run says otherwise."""
    from asteroid_fx import models

    entry = models.get(name)
    samples = GeneratedSamples(entry, small, batch * iterations, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        example = entry.example(batch, small)
    return Job(model=lambda: entry.build(small=small), dataset=samples, loss=entry.loss, batch=batch,
               example=example[0] if len(example) == 1 else example, optimizer="sgd", lr=0.05, shuffle=False,
               name=f"{name}{':small' if small else ''}")
