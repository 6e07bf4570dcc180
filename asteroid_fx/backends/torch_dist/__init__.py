"""torch_dist backend: every device is one process that runs its own action list on
torch.distributed, with gloo process groups on CPU tensors. (CUDA devices with nccl are not
supported yet: the early-posted receives would serialize behind sends on nccl's per-pair stream,
recovery needs gloo's blocking waits, and no GPU has run this backend. An NCCL transport is a
``backends.base.Comm`` beside ``gloo.Comm``; the worker takes any Comm.)

One concern per module:
  worker       DistWorker (a ``backends.base.Runner``): the actions of one device, with F and B
               through ``backends.stage.StageReplica``; receives posted ahead; backups and rollbacks
  gloo         Comm: the process groups of a membership epoch (built in one place), waits that a
               failure interrupts, ``cut_connections``, ``init_process_group``
  messages     what travels: tags, the backup header, StateLayout, and ``TaggedMessages`` (the
               Comm's message methods over tagged sends and receives)
  flat_state   FlatState (a replica's state in one buffer) and a StateCopy as a message and back
  emulation    Emulation: pacing a worker like a slower device of the cluster
"""

from asteroid_fx.backends.base import Interrupted
from asteroid_fx.backends.torch_dist.emulation import PACED, SHAPED_LINKS_ENV, Emulation
from asteroid_fx.backends.torch_dist.flat_state import (
    FlatState,
    live_state,
    state_from_message,
    state_message,
)
from asteroid_fx.backends.torch_dist.gloo import (
    CAN_CUT,
    CHECK_IN_POLL_S,
    Comm,
    cut_connections,
    has_backups,
    init_process_group,
    sends_grads,
)
from asteroid_fx.backends.torch_dist.messages import (
    BACKUP_TAG,
    COPY,
    DTYPES,
    HEADER_BYTES,
    LAYOUT,
    StateLayout,
    TaggedMessages,
    message_bytes,
    message_tag,
    read_header,
    state_tag,
    write_header,
)
from asteroid_fx.backends.torch_dist.worker import ACTIONS, DistWorker, receive_runs

__all__ = [
    "ACTIONS", "BACKUP_TAG", "CAN_CUT", "CHECK_IN_POLL_S", "COPY", "DTYPES", "HEADER_BYTES", "LAYOUT", "PACED",
    "SHAPED_LINKS_ENV", "Comm", "DistWorker", "Emulation", "FlatState", "Interrupted", "StateLayout",
    "TaggedMessages", "cut_connections", "has_backups", "init_process_group", "live_state", "message_bytes",
    "message_tag", "read_header", "receive_runs", "sends_grads", "state_from_message", "state_message", "state_tag",
    "write_header",
]
