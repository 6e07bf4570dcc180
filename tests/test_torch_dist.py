"""torch_dist backend: real worker processes (gloo on loopback) train exactly like the local backend."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import asteroid_fx as asteroid
from asteroid_fx.backends.torch_dist import TaggedMessages
from asteroid_fx.ir.cluster import Cluster, Device
from asteroid_fx.runtime.auth import SECRET_ENV, SECRET_FILE_ENV
from asteroid_fx.runtime.launcher import launch
from asteroid_fx.runtime.spec import RunSpec, batches, compile_spec, iterations_of, optimizer_of
from tests.test_backends import CASES, CLUSTER  # the parity with the local backend is tested there
from tests.ranks import spawn_ranks


def test_a_worker_whose_program_differs_fails_the_run_with_its_error(tmp_path, monkeypatch):
    spec = CASES["mlp-hybrid-1f1b"]
    # a worker that cannot compile the launcher's program: it must fail fast, not hang the others
    import asteroid_fx.runtime.launcher as launch_mod

    original = launch_mod.format_program
    monkeypatch.setattr(launch_mod, "format_program", lambda p: original(p) + "# launcher differs\n")
    with pytest.raises(RuntimeError, match="differs from the launcher's"):
        launch(spec, CLUSTER, tmp_path, timeout_s=120, log=lambda m: None)


def test_emulated_links_pace_the_run_like_the_cost_model(tmp_path):
    # a slow link (0.8 Mbit/s) makes the transfers dominate, so the measured iteration time is the
    # emulated one, which the planner's closed form predicts
    slow = Cluster.uniform([Device("a", "jetson-agx-orin"), Device("b", "jetson-agx-orin")],
                           bandwidth=1e5, latency=2e-3)
    spec = RunSpec(model="mlp:small", batch=32, microbatches=2, groups=(("a",), ("b",)), rows=((16,), (16,)),
                   iterations=3, emulate=True)
    result = launch(spec, slow, tmp_path, timeout_s=240, log=lambda m: None)
    predicted = result["plan"].prediction.iteration_s
    measured = min(result["seconds"][1:])
    assert predicted > 0.1  # the links dominate: >= 4 transfers of 16 rows x 256 B at 1e5 B/s
    assert 0.8 * predicted <= measured <= 1.6 * predicted, (measured, predicted)
    # emulation changes the timing only, never the numbers
    plain = launch(dataclasses.replace(spec, emulate=False), slow, tmp_path / "plain", timeout_s=240, log=lambda m: None)
    assert plain["losses"] == result["losses"]


def test_a_worker_that_cannot_reach_the_coordinator_stops_with_a_message(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "asteroid_fx.cli", "worker", "--coordinator", f"127.0.0.1:{port}",
                           "--device", "a", "--out", str(tmp_path), "--connect-timeout", "2"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, SECRET_ENV: "s" * 64})
    assert proc.returncode != 0
    assert "cannot reach the coordinator" in proc.stderr
    assert time.monotonic() - started < 30


def test_remote_workers_join_by_device_name_and_by_torchrun_rank(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    import threading
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = CASES["mlp-hybrid-1f1b"]
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        launch(spec, CLUSTER, tmp_path, timeout_s=120, log=lambda m: None, port=port, remote=["b", "c"])))
    thread.start()
    # the user copies the run's secret to the remote machines: the file the launcher writes
    secret = tmp_path / "store.secret"
    deadline = time.monotonic() + 120
    while not secret.exists() and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert secret.stat().st_mode & 0o777 == 0o600
    worker = [sys.executable, "-m", "asteroid_fx.cli", "worker", "--out", str(tmp_path / "remote")]
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    env[SECRET_FILE_ENV] = str(secret)
    by_name = subprocess.Popen(worker + ["--coordinator", f"127.0.0.1:{port}", "--device", "b"], env=env)
    # torchrun's variables: rank 2 is the program's third device, c
    env = dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="2", WORLD_SIZE="3")
    by_rank = subprocess.Popen(worker, env=env)
    try:
        assert by_name.wait(timeout=120) == 0 and by_rank.wait(timeout=120) == 0
        thread.join(timeout=120)
    finally:
        for p in (by_name, by_rank):
            if p.poll() is None:
                p.kill()
    assert result["program"].devices == ("a", "b", "c")
    local = compile_spec(spec, CLUSTER)
    _, losses = local.run(batches(spec), iterations_of(spec), optimizer=optimizer_of(spec))
    assert result["losses"] == pytest.approx(losses, rel=1e-6)


def test_time_dilation_stretches_every_emulated_duration():
    from asteroid_fx.ir import catalog
    from asteroid_fx import models
    from asteroid_fx.backends.torch_dist import Emulation
    from asteroid_fx.ir.program import Action, Op

    entry = models.get("mlp")
    torch.manual_seed(0)
    compiled = asteroid.compile(entry.build(small=True), catalog.preset("edge-4-1g"), example=entry.example(8, True),
                                loss=entry.loss, microbatches=2, groups=[["nano0", "tx2-0"], ["xnx0"]],
                                rows=[[2, 2], [4]], layers=[0, 3, 6])
    plain = Emulation(compiled.layer_graph, compiled.cluster)
    slow = Emulation(compiled.layer_graph, compiled.cluster, dilation=10.0)
    f = Action(Op.F, 0, 0, (0, 2))
    assert slow.compute_s("nano0", f, (0, 3)) == pytest.approx(10 * plain.compute_s("nano0", f, (0, 3)))
    assert slow.allreduce_s(("nano0", "tx2-0"), (0, 3)) == pytest.approx(10 * plain.allreduce_s(("nano0", "tx2-0"), (0, 3)))
    (bw, lat), (bw10, lat10) = plain.link("nano0", "xnx0"), slow.link("nano0", "xnx0")
    assert (bw10, lat10) == pytest.approx((bw / 10, lat * 10))


# --- backups: one packed message, the layout once per link ----------------------------------------


def test_a_state_layout_packs_every_dtype_and_shape_and_travels_as_json():
    import json

    from asteroid_fx.backends.torch_dist import HEADER_BYTES, StateLayout, read_header

    tensors = [torch.randn(3, 5), torch.tensor(7.0), torch.arange(4), torch.tensor([True, False, True]),
               torch.randn(2, dtype=torch.float64), torch.empty(0, 3), torch.randn(6, dtype=torch.bfloat16)]
    meta = tuple(("p", f"t{i}", "", str(t.dtype).removeprefix("torch."), tuple(t.shape)) for i, t in enumerate(tensors))
    meta += (("v", "t0", "count", "json", "3"),)
    layout = StateLayout.of(meta)
    assert StateLayout.of(json.loads(json.dumps(layout.meta))) == layout  # the holder's copy of the layout
    assert layout.nbytes % 64 == 0 and all(offset % 64 == 0 for _, offset, _, _ in layout.segments)
    buf = layout.pack(tensors, (1.0, 4.0, 0.5, 0.0))
    assert buf.numel() == layout.nbytes and buf.numel() >= HEADER_BYTES + sum(t.nbytes for t in tensors)
    assert read_header(buf) == (1.0, 4.0, 0.5, 0.0)
    for got, want in zip(layout.unpack(buf), tensors, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


class _Loopback(TaggedMessages):
    """Comm's send, recv and wait between workers of one process: a send is delivered at once, a
    receive takes the oldest message on its (peer, tag) when waited on, which must have its size
    (gloo's rule). ``cut`` makes every wait on a receive fail as a dead peer's does. The message
    methods of the Comm protocol (send_state, recv_state, ...) come from TaggedMessages, as gloo's."""

    def __init__(self, device: str, wires: dict):
        self.device, self.wires, self.sent, self.cut = device, wires, [], False

    def send(self, t, peer, tag, **_):
        self.wires.setdefault((self.device, peer, tag), []).append(t.clone())
        self.sent.append(tag)

    def recv(self, t, peer, tag, **_):
        return t, (peer, self.device, tag)

    def wait_all(self, works):
        for work in works:
            self.wait(work)

    def wait(self, work):
        if work is None:
            return
        if self.cut:
            from asteroid_fx.backends.torch_dist import Interrupted

            raise Interrupted()
        t, key = work
        message = self.wires[key].pop(0)
        assert message.shape == t.shape, f"a message of {message.numel()} bytes into a receive of {t.numel()}"
        t.copy_(message)


def _two_workers():
    """Stage 0 on a, stage 1 on b (Adam), each with a loopback Comm."""
    from asteroid_fx.backends.torch_dist import DistWorker

    spec = RunSpec(model="mlp:small", batch=8, microbatches=2, groups=(("a",), ("b",)), rows=((4,), (4,)),
                   optimizer="adam")
    c = compile_spec(spec, CLUSTER)
    wires: dict = {}
    names = [n.name for n in c.captured.module.graph.nodes if n.op == "placeholder"]
    return tuple(DistWorker(c.program, c.stages, d, loss=c.loss, unflatten=c.captured.unflatten_outputs,
                            input_names=names, optimizer="adam", comm=_Loopback(d, wires)) for d in "ab")


def _adam_step(worker) -> None:
    for p in worker.module.parameters():
        p.grad = torch.randn_like(p)
    worker.optimizer.step()


def test_a_backup_is_one_message_once_its_layout_is_known_and_files_the_exact_state():
    from asteroid_fx.backends.local import StateCopy
    from asteroid_fx.ir.program import Action, Op

    a, b = _two_workers()
    backup, restore = [Action(Op.BACKUP, 0, peer="b")], [Action(Op.RESTORE, 0, peer="a")]
    for i in range(4):
        if i:
            _adam_step(a)  # the first step creates Adam's state: the layout changes once, at iteration 1
        sent = len(a.comm.sent)
        b.drop_copies_before(i)  # as every iteration starts: the receive of a known layout is posted here
        a.step((), None, actions={"a": backup}, iteration=i)
        b.step((), None, actions={"b": restore}, iteration=i)
        assert len(a.comm.sent) - sent == (3 if i < 2 else 1)  # notice, layout, copy; then the copy alone
        want, got = StateCopy.of(a.module, a.optimizer), b.copies[i]
        assert got.params.keys() == want.params.keys() and got.optim.keys() == want.optim.keys()
        for n in want.params:
            assert torch.equal(got.params[n], want.params[n])
        for n, state in want.optim.items():
            assert state.keys() == got.optim[n].keys()
            assert all(torch.equal(got.optim[n][k], v) for k, v in state.items())


def test_a_backup_cut_off_by_a_failure_is_never_filed():
    from asteroid_fx.backends.torch_dist import Interrupted
    from asteroid_fx.ir.program import Action, Op

    a, b = _two_workers()
    backup, restore = [Action(Op.BACKUP, 0, peer="b")], [Action(Op.RESTORE, 0, peer="a")]
    a.step((), None, actions={"a": backup}, iteration=0)
    b.step((), None, actions={"b": restore}, iteration=0)
    _adam_step(a)
    b.drop_copies_before(0)
    a.step((), None, actions={"a": backup}, iteration=1)
    b.comm.cut = True  # the sender dies while its copy is on the way
    with pytest.raises(Interrupted):
        b.step((), None, actions={"b": restore}, iteration=1)
    assert set(b.copies) == {0}


def test_the_copy_sent_after_the_step_is_the_senders_next_rollback_point():
    from asteroid_fx.backends.local import StateCopy
    from asteroid_fx.ir.program import Action, Op

    a, b = _two_workers()
    for p in a.module.parameters():
        p.grad = torch.randn_like(p)
    a.step((), None, actions={"a": [Action(Op.STEP, 0), Action(Op.BACKUP, 0, peer="b")]}, iteration=0)
    want = StateCopy.of(a.module, a.optimizer)
    a.take_point(1)
    got = a.copies[1]
    assert got.params.keys() == want.params.keys() and got.optim.keys() == want.optim.keys()
    assert all(torch.equal(got.params[n], t) for n, t in want.params.items())
    assert all(torch.equal(got.optim[n][k], v) for n, state in want.optim.items() for k, v in state.items())
    with torch.no_grad():
        next(a.module.parameters()).add_(1.0)  # the next iteration changes the stage: the point stays
    assert all(torch.equal(got.params[n], t) for n, t in want.params.items())


class _Tied(torch.nn.Module):
    """A stage with a weight under two names and BatchNorm buffers (float and int64)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(6, 6)
        self.norm = torch.nn.BatchNorm1d(6)
        self.head = torch.nn.Linear(6, 6)
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(self.norm(self.embed(x)))


class _Replacing(torch.optim.Optimizer):
    """An optimizer that stores new state tensors every step instead of updating them in place."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.1})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["avg"] = 0.5 * state.get("avg", torch.zeros_like(p)) + p.grad
                state["count"] = state.get("count", 0) + 1
                p.sub_(group["lr"] * state["avg"])


def _same_state(got, want) -> bool:
    from asteroid_fx.backends.local import StateCopy

    assert isinstance(got, StateCopy)
    return (got.params.keys() == want.params.keys() and got.buffers.keys() == want.buffers.keys()
            and got.optim.keys() == want.optim.keys()
            and all(torch.equal(got.params[n], t) for n, t in want.params.items())
            and all(torch.equal(got.buffers[n], t) for n, t in want.buffers.items())
            and all(state.keys() == got.optim[n].keys() and all(
                torch.equal(got.optim[n][k], v) if isinstance(v, torch.Tensor) else got.optim[n][k] == v
                for k, v in state.items()) for n, state in want.optim.items()))


@pytest.mark.parametrize("make_optimizer", [lambda ps: torch.optim.Adam(ps, lr=0.1), _Replacing],
                         ids=["adam", "replaces its tensors"])
def test_a_flat_copy_is_the_exact_state_through_steps_rollbacks_and_tied_weights(make_optimizer):
    from asteroid_fx.backends.local import StateCopy
    from asteroid_fx.backends.torch_dist import FlatState, state_from_message

    torch.manual_seed(0)
    model = _Tied()
    optimizer = make_optimizer(list(model.parameters()))
    flat = FlatState(model, optimizer)
    laid_out = []
    lay_out = flat._lay_out
    flat._lay_out = lambda *args: (laid_out.append(1), lay_out(*args))

    def copied() -> StateCopy:
        layout, buf = flat.copy()
        return state_from_message(layout.meta, layout.unpack(buf))

    points = []
    for i in range(4):
        points.append((copied(), StateCopy.of(model, optimizer)))
        loss = model(torch.randn(5, 6)).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = copied()
    assert _same_state(after, StateCopy.of(model, optimizer))
    for got, want in points:  # earlier copies are not views of the live state
        assert _same_state(got, want)
    assert model.head.weight is model.embed.weight and model.embed.weight.data_ptr() != 0
    # Adam updates in place: laid out before the first step and once its state exists; the other every step
    assert len(laid_out) == (2 if make_optimizer is not _Replacing else 5)
    # a rollback loads new optimizer state tensors: the next copy is laid out again and still exact
    points[1][0].load_into(model, optimizer)
    assert _same_state(copied(), points[1][1])


def test_the_store_listens_only_on_the_address_it_is_given():
    import socket

    from asteroid_fx.runtime.store import serve_store

    store = serve_store("127.0.0.2", 0)  # another loopback address: the test needs no network
    port = store.port
    store.set("k", "v")
    with socket.create_connection(("127.0.0.2", port), timeout=5):
        pass
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        taken = s.getsockname()[1]
        s.listen()
        with pytest.raises(OSError, match="cannot listen on 127.0.0.1"):
            serve_store("127.0.0.1", taken)


def test_building_an_epochs_groups_waits_for_every_member_and_an_agreed_failure_interrupts_it():
    import threading
    import time

    from asteroid_fx.backends.torch_dist import Comm, Interrupted
    from asteroid_fx.runtime.store import serve_store

    program = compile_spec(RunSpec(model="mlp:small", batch=8, microbatches=2, groups=(("a",), ("b",)),
                                   rows=((4,), (4,))), CLUSTER).program
    store = serve_store("127.0.0.1", 0)
    interrupt = threading.Event()
    threading.Timer(0.3, interrupt.set).start()  # b never comes: it died; the failure is agreed 0.3 s on
    started = time.monotonic()
    with pytest.raises(Interrupted):
        Comm(store, program, "a", epoch=1, timeout_s=30, interrupt=interrupt)
    assert 0.25 < time.monotonic() - started < 5  # not gloo's rendezvous timeout (30 s here)


# --- clipping by the global norm: one gloo process per device clips like the local backend --------


def _clip_worker(rank: int, world: int, port: int, devices: list[str], case: str, out: str) -> None:
    import datetime

    import torch.distributed as dist

    from asteroid_fx.backends.torch_dist import DistWorker
    from asteroid_fx.backends.torch_dist.gloo import Comm as GlooComm
    from tests.test_clip_norm import _batches, _gpt, _mlp, sgd

    torch.set_num_threads(1)
    entry, _, compiled = _mlp() if case == "mlp" else _gpt("three")
    device = devices[rank]
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=datetime.timedelta(seconds=120))
    if case == "mlp":  # the groups of a membership epoch, as the runtime builds them
        comm = GlooComm(store, compiled.program, device, timeout_s=120)
    else:  # torch.distributed's default group and its sub-groups
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
        comm = None
    names = [n.name for n in compiled.captured.module.graph.nodes if n.op == "placeholder"]
    worker = DistWorker(compiled.program, compiled.stages, device, loss=entry.loss,
                        unflatten=compiled.captured.unflatten_outputs, input_names=names, optimizer=sgd, comm=comm)
    losses = [worker.step(inputs, labels) for inputs, labels in _batches(entry)]
    torch.save({"losses": losses, "state": worker.state_dict()}, f"{out}/{device}.pt")
    worker.comm.barrier()
    if comm is None:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", ["mlp", "tied"])
def test_clip_grad_norm_on_gloo_workers_equals_the_local_backend(case, tmp_path):

    import torch.distributed as dist

    from tests.test_clip_norm import _batches, _gpt, _mlp, sgd

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    entry, _, compiled = _mlp() if case == "mlp" else _gpt("three")
    assert any(a.op.value == "NORM" for a in compiled.program.of(compiled.program.devices[0]))
    devices = list(compiled.program.devices)
    spawn_ranks(_clip_worker, devices, case, str(tmp_path))
    runner, losses = compiled.run(iter(_batches(entry)), 3, optimizer=sgd)
    results = {d: torch.load(tmp_path / f"{d}.pt", weights_only=True) for d in devices}
    last = compiled.program.stages[-1].devices
    assert [sum(x) for x in zip(*(results[d]["losses"] for d in last))] == pytest.approx(losses, rel=1e-6)
    want = runner.state_dict()
    for d in devices:  # every device's copy of what it holds, group members and tied copies included
        for k, v in results[d]["state"].items():
            if k in want:
                torch.testing.assert_close(v, want[k], rtol=1e-6, atol=1e-7, msg=lambda m: f"{d} {k}: {m}")
    assert {k for d in devices for k in results[d]["state"]} >= want.keys()


# --- a stage's gradient sum: row order, whoever holds which chunk ----------------------------------


THREE = RunSpec(model="mlp:small", batch=9, microbatches=1, groups=(("host0", "host1", "host2"),), rows=((4, 1, 4),))
SUM_LAYOUTS = (
    (),  # one chunk per device, as a failure-free group runs
    (2, 7),  # host0 and host2 also run a lost device's rows as a chunk of their own: 2 + 1 + 2 chunks
)


def _chunk_values(lo: int, n: int) -> torch.Tensor:
    """A chunk's flat gradients: float32 over many magnitudes, so that the order of a sum shows."""
    g = torch.Generator().manual_seed(lo)
    return torch.randn(n, generator=g) * 10.0 ** torch.randint(-3, 4, (n,), generator=g)


def _sum_worker(rank: int, world: int, port: int, devices: list[str], out: str) -> None:
    import datetime

    import torch.distributed as dist

    from asteroid_fx.backends.torch_dist.gloo import Comm as GlooComm

    program = compile_spec(THREE, asteroid.resolve_cluster("host-4")).program
    device = devices[rank]
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=datetime.timedelta(seconds=60))
    comm = GlooComm(store, program, device, timeout_s=60)
    n, results = 1001, {}  # not a multiple of the group's size
    for splits in SUM_LAYOUTS:
        stage = dataclasses.replace(program.stages[0], splits=splits)
        mine = [_chunk_values(lo, n) for lo, _ in stage.chunks_of(device)]
        results[splits] = comm.sum_stage_chunks(mine, stage)
    ring = mine[0].clone()  # gloo's own all-reduce of the one-chunk layout, for comparison
    comm.wait(comm.allreduce(comm.group, [ring]))
    torch.save({"sums": results, "ring": ring}, f"{out}/{device}.pt")
    comm.barrier()


def test_a_stages_gradient_sum_is_in_row_order_bit_for_bit_whoever_holds_the_chunks(tmp_path):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    devices = ["host0", "host1", "host2"]
    spawn_ranks(_sum_worker, devices, str(tmp_path))
    got = {d: torch.load(tmp_path / f"{d}.pt", weights_only=True) for d in devices}
    program = compile_spec(THREE, asteroid.resolve_cluster("host-4")).program
    for splits in SUM_LAYOUTS:
        chunks = dataclasses.replace(program.stages[0], splits=splits).chunks
        want = _chunk_values(chunks[0][1], 1001)
        for _, lo, _ in chunks[1:]:
            want += _chunk_values(lo, 1001)
        for d in devices:
            assert torch.equal(got[d]["sums"][splits], want), (splits, d)
    # what the failure-free group would have summed without it: not the row-order sum
    assert not torch.equal(got["host0"]["ring"], got["host0"]["sums"][()])
