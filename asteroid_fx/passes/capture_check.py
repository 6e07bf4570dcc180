"""capture_check: the captured graph computes what the eager module computes, or compile stops.

Capture records what forward did once, on the example. A forward that reads Python state which
changes between calls (an attribute or global updated in forward, Python's ``random``), that
writes a buffer or an input in place and reads it back, or that is handed one tensor as two
inputs, can be recorded as a graph that computes something else; training would then silently
train another model. So compile runs both, in train mode as they will be trained, on the example
and on a second batch drawn like it, and compares. With a symbolic batch dim the check runs on the
example's first ``CHECK_ROWS`` rows (every batch-first input cut, the rest as given): what forward
computes on a row does not depend on how many rows come with it once the batch is a size only, and
the full example would cost four full forwards of the model. A cut example that forward cannot take
(an error, not a mismatch) is checked whole instead.

Expects a ``Captured`` of ``model(*args, **kwargs)`` (passes/capture.py) and the user's model.
Guarantees:
  - returns None when every output of the graph equals the eager output within float32 tolerance
    (``RTOL``, ``ATOL`` times the output's scale; non-float outputs exactly) on both batches;
  - otherwise raises InputError naming the input (and the rows it was cut to), the output, the
    first graph node whose value diverges from its eager module's output (graph nodes are matched
    to modules through ``node.meta["nn_module_stack"]``, eager outputs are taken by forward hooks;
    modules are looked at in the order their forward returns) and what to try;
  - a difference that vanishes in eval mode in a graph that draws random numbers is randomness,
    not a wrong capture: it is reported with a warning, not an error. Both sides are seeded alike
    before every run (inside ``torch.random.fork_rng``, so the caller's RNG state is untouched);
    an eager forward that differs from itself from the same seed (NumPy or Python random numbers,
    which the graph froze) is named as such in the error;
  - ``model`` is untouched: eager runs use a copy that shares its parameters (never written by a
    forward) and holds copies of its buffers and Python state; the captured module's buffers are
    restored after its runs.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Iterator, NamedTuple

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from asteroid_fx.ir.errors import InputError
from asteroid_fx.passes.capture import Captured

RTOL = 1e-4
ATOL = 1e-5  # times max(1, the largest eager magnitude of the output): a scale-free float32 floor
SEED = 0x5EED
_CHUNK = 1 << 22  # elements compared at a time: float64 temporaries of 32 MB, and few ops
CHECK_ROWS = 2  # rows the check runs on when the batch is symbolic (BatchNorm in train mode needs 2), as annotate_costs

_SKIP = "To compile anyway, pass check_capture=False to compile() (--no-capture-check to `asteroid compile`)."

# ops through which a graph draws random numbers: a difference found with one of them in the graph
# and gone in eval mode is put down to randomness
_RANDOM_OPS = frozenset(("dropout", "native_dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout",
                         "bernoulli", "bernoulli_", "rand", "rand_like", "randn", "randn_like", "randint",
                         "randint_like", "randperm", "normal", "normal_", "uniform_", "multinomial",
                         "scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu"))


class _Call(NamedTuple):
    what: str  # how the error names this input: "the example", "a second batch drawn like the example"
    args: tuple
    kwargs: dict
    cut: tuple[int, int] | None = None  # (rows run, the example's rows) when the example was cut


class _Mismatch(NamedTuple):
    index: int  # which flat output
    detail: str  # "differs by up to 3.7e-02" / "has shape (2, 3) in the graph, (2, 4) in eager"


def verify_capture(captured: Captured, model: torch.nn.Module, args: Any, kwargs: dict | None = None) -> None:
    """Raise InputError if ``captured`` does not compute ``model(*args, **kwargs)`` in train mode."""
    args = args if isinstance(args, tuple) else (args,)
    kwargs = dict(kwargs or {})
    calls = _first_rows(captured, args, kwargs, CHECK_ROWS)
    try:
        found = None if calls is None else _first_mismatch(captured, model, calls, train=True)
    except Exception:  # forward cannot take the cut rows (not a mismatch): check the example whole
        calls = None
    if calls is None:
        calls = _calls(args, kwargs)
        found = _first_mismatch(captured, model, calls, train=True)
    if found is None:
        return
    k, mismatch = found
    if _draws_random(captured.module) and _first_mismatch(captured, model, calls, train=False) is None:
        warnings.warn(
            f"the captured graph of {type(model).__name__} gives other outputs than eager in train mode "
            f"(output {mismatch.index} {mismatch.detail} on {calls[k].what}{_rows_note(calls[k])}, with the "
            "same seed) but the same "
            "in eval mode: the difference is randomness (dropout), drawn in another order by the graph than by "
            "eager forward. Training is not wrong for it; set dropout to 0 to see the graph and eager agree.",
            stacklevel=2)
        return
    raise InputError(_message(captured, model, calls, k, mismatch))


# --- inputs ------------------------------------------------------------------------------------

def _calls(args: tuple, kwargs: dict, cut: tuple[int, int] | None = None) -> list[_Call]:
    """The example and a second batch drawn like it."""
    return [_Call("the example", args, kwargs, cut), _drawn_like(args, kwargs)._replace(cut=cut)]


def _first_rows(captured: Captured, args: tuple, kwargs: dict, rows: int) -> list[_Call] | None:
    """The calls on the example's first ``rows`` rows: every batch-first input (as its placeholder
    was traced) cut, in a storage of its own so a forward that writes its input leaves the
    example's alone, the other inputs as given; one tensor passed twice stays one tensor. None
    without a symbolic batch dim (a size that merely equals the batch cannot be told from it), when
    the example has no more rows, or when one tensor is batch-first at one input and not at another."""
    if captured.batch_symbol is None or captured.example_batch <= rows:
        return None
    placeholders = [n for n in captured.module.graph.nodes if n.op == "placeholder"]
    flat = captured.flatten_inputs(args, kwargs)
    batched: dict[int, bool] = {}
    for node, x in zip(placeholders, flat):
        if isinstance(x, torch.Tensor):
            is_batched = captured.is_batched(node.meta.get("val"))
            if batched.setdefault(id(x), is_batched) != is_batched:
                return None
    if not any(batched.values()):
        return None
    cut: dict[int, torch.Tensor] = {}

    def take(x: Any) -> Any:
        if not (isinstance(x, torch.Tensor) and batched.get(id(x))):
            return x
        if id(x) not in cut:
            cut[id(x)] = x[:rows].clone()
        return cut[id(x)]

    args2, kwargs2 = pytree.tree_map(take, (args, kwargs))
    return _calls(args2, kwargs2, (rows, captured.example_batch))


def _rows_note(call: _Call) -> str:
    """Which rows the call ran on, when the example was cut: for the error and the warning."""
    if call.cut is None:
        return ""
    rows, batch = call.cut
    if call.what == "the example":
        return f", on the example's first {rows} of its {batch} rows"
    return f", {rows} rows drawn like the example's first {rows} of its {batch}"


def _drawn_like(args: tuple, kwargs: dict) -> _Call:
    """Inputs of the example's shapes and dtypes with fresh values in its ranges: a float tensor
    uniform between its min and max, an integer one (token ids) between its min and max, one of
    at most two distinct values (a mask: 0/1, 0/-inf) a random pick of them. A tensor passed twice
    is drawn once, so aliasing is kept; non-tensors are kept."""
    drawn: dict[int, torch.Tensor] = {}
    g = torch.Generator().manual_seed(SEED)

    def draw(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.numel() == 0:
            return x
        if id(x) not in drawn:
            drawn[id(x)] = _draw(x.detach(), g)
        return drawn[id(x)]

    args2, kwargs2 = pytree.tree_map(draw, (args, kwargs))
    return _Call("a second batch drawn like the example", args2, kwargs2)


def _draw(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    flat = x.flatten().cpu()
    values = flat.unique()
    if len(values) <= 2 or x.dtype == torch.bool:
        pick = torch.randint(0, len(values), flat.shape, generator=g)
        out = values[pick]
    elif not x.is_floating_point():
        out = torch.randint(int(values[0]), int(values[-1]) + 1, flat.shape, generator=g, dtype=x.dtype)
    elif torch.isfinite(values).all():
        lo, hi = values[0].double(), values[-1].double()
        out = (lo + (hi - lo) * torch.rand(flat.shape, generator=g, dtype=torch.float64)).to(x.dtype)
    else:  # infinities mean something to the model (a mask): keep the values, move them around
        out = flat[torch.randperm(len(flat), generator=g)]
    return out.reshape(x.shape).to(x.device)


# --- runs --------------------------------------------------------------------------------------

def _first_mismatch(captured: Captured, model: torch.nn.Module, calls: list[_Call],
                    train: bool) -> tuple[int, _Mismatch] | None:
    """The first call (in order, on one eager copy: state carried from call to call, as in
    training) whose outputs differ, with the first output that differs."""
    graph = captured.module if train else _eval_graph(captured.module)
    eager = _eager_copy(model, train)
    with _kept_buffers(captured.module):
        for k, call in enumerate(calls):
            want = pytree.tree_leaves(_seeded(lambda: eager(*call.args, **call.kwargs), call))
            # forward, not __call__: export's pre-hook wants the user's structure, the graph takes it flat
            got = list(_seeded(lambda: graph.forward(*captured.flatten_inputs(call.args, call.kwargs)), call))
            mismatch = _compare(got, want)
            if mismatch is not None:
                return k, mismatch
    return None


def _eager_copy(model: torch.nn.Module, train: bool) -> torch.nn.Module:
    """A copy to run: the model's own parameters (forward reads them), copies of the rest."""
    shared = {id(p): p for p in model.parameters()}
    return copy.deepcopy(model, memo=shared).train(train)


def _eval_graph(gm: fx.GraphModule) -> fx.GraphModule:
    from asteroid_fx.passes.eval_mode import eval_mode

    return eval_mode(gm)


@contextlib.contextmanager
def _kept_buffers(gm: fx.GraphModule) -> Iterator[None]:
    """The graph's runs write its buffers (BatchNorm's running statistics): put them back."""
    saved = {name: b.detach().clone() for name, b in gm.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in gm.named_buffers():
                b.copy_(saved[name])


def _seeded(run: Any, call: _Call) -> Any:
    """``run()`` without gradients, from the same RNG state every time, leaving the caller's alone."""
    devices = sorted({x.device.index or 0 for x in pytree.tree_leaves((call.args, call.kwargs))
                      if isinstance(x, torch.Tensor) and x.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(SEED)
        return run()


def _compare(got: list, want: list) -> _Mismatch | None:
    if len(got) != len(want):
        return _Mismatch(0, f"count differs: the graph returns {len(got)} values, eager forward {len(want)}")
    for i, (g, w) in enumerate(zip(got, want)):
        detail = _differs(g, w)
        if detail is not None:
            return _Mismatch(i, detail)
    return None


def _differs(got: Any, want: Any) -> str | None:
    """Why ``got`` is not ``want`` within tolerance, or None."""
    if not isinstance(want, torch.Tensor):
        if isinstance(got, torch.Tensor) or (type(want) in (int, float, bool, str) and got != want):
            return f"is {_short(got)} in the graph but {_short(want)} in eager forward"
        return None
    if not isinstance(got, torch.Tensor):
        return f"is {_short(got)} in the graph but a tensor in eager forward"
    if got.shape != want.shape or got.dtype != want.dtype:
        return (f"is {str(got.dtype).removeprefix('torch.')}{list(got.shape)} in the graph but "
                f"{str(want.dtype).removeprefix('torch.')}{list(want.shape)} in eager forward")
    if not want.is_floating_point() and not want.is_complex():
        return None if torch.equal(got, want) else "differs (exact values expected)"
    err = _error(got, want)
    return None if err <= 1 else f"differs by up to {_max_abs(got, want):.2e}"


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / (atol + rtol |want|): at most 1 is a match; NaN matches NaN only.
    Computed in float64 a chunk of ``_CHUNK`` elements at a time: on a whole large output (a
    language model's logits) the float64 temporaries cost more than the forward that made it."""
    g, w = got.detach().reshape(-1), want.detach().reshape(-1)
    if g.numel() == 0 or torch.equal(g, w):  # bit for bit (no NaN): the usual case, and cheap
        return 0.0
    parts = [(g[i:i + _CHUNK], w[i:i + _CHUNK]) for i in range(0, g.numel(), _CHUNK)]
    tops = []
    for gc, wc in parts:
        gc, wc = gc.double(), wc.double()
        if not torch.equal(torch.isnan(gc), torch.isnan(wc)):
            return float("inf")
        tops.append(wc.abs().nan_to_num_(nan=0.0, posinf=0.0).max())  # the largest finite magnitude
    scale = max(1.0, float(torch.stack(tops).max()))
    worst = []
    for gc, wc in parts:
        gc, wc = gc.double(), wc.double()
        ratio = (gc - wc).abs_().div_(wc.abs().mul_(RTOL).add_(ATOL * scale))
        # equal infinities compare equal (their difference would be NaN); NaN matches NaN
        ratio.masked_fill_((gc == wc).logical_or_(torch.isnan(wc)), 0.0)
        worst.append(ratio.nan_to_num_(nan=float("inf")).max())
    return float(torch.stack(worst).max())


def _max_abs(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach().double()).abs().nan_to_num(nan=float("inf")).max())


def _short(x: Any) -> str:
    text = repr(x) if type(x) in (int, float, bool, str, type(None)) else type(x).__name__
    return text if len(text) < 40 else text[:37] + "..."


def _draws_random(gm: fx.GraphModule) -> bool:
    def name(target: Any) -> str:
        return getattr(target, "__name__", str(target)).split(".")[0]
    return any(n.op == "call_function" and name(n.target) in _RANDOM_OPS for n in gm.graph.nodes) or any(
        isinstance(m, torch.nn.modules.dropout._DropoutNd) for m in gm.modules())


# --- where it diverges -------------------------------------------------------------------------

class _Where(NamedTuple):
    node: str
    module: str  # its path in the model, "" for the model itself
    kind: str  # the module's class name
    detail: str
    fed_to: str = ""  # the module the node is an input of, when the node comes from outside it


def _locate(captured: Captured, model: torch.nn.Module, calls: list[_Call], k: int) -> _Where | None:
    """Replay calls[:k] on both sides, then run calls[k] recording every graph node's value and
    every eager module's inputs and output. The first module (in the order eager forwards return)
    whose output no graph value leaving that module matches is where it diverges: at the graph value
    it is fed, if one of those already differs, else at its output."""
    eager = _eager_copy(model, True)
    gm = captured.module
    with _kept_buffers(gm):
        for call in calls[:k]:
            _seeded(lambda: eager(*call.args, **call.kwargs), call)
            _seeded(lambda: gm.forward(*captured.flatten_inputs(call.args, call.kwargs)), call)
        call = calls[k]
        seen: list[tuple[str, str, list, list]] = []
        names = {m: name for name, m in eager.named_modules()}

        def hook(module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            seen.append((names[module], type(module).__name__, _tensors((args, kwargs)), _tensors(output)))

        handles = [m.register_forward_hook(hook, with_kwargs=True) for m in names]
        try:
            _seeded(lambda: eager(*call.args, **call.kwargs), call)
        finally:
            for h in handles:
                h.remove()
        recorder = fx.Interpreter(gm, garbage_collect_values=False)
        _seeded(lambda: recorder.run(*captured.flatten_inputs(call.args, call.kwargs)), call)
    values = recorder.env
    inside = _inside(gm)
    for path, kind, inputs, outputs in seen:
        nodes = inside.get(path, set())
        leaving = [n for n in gm.graph.nodes if n in nodes and any(u not in nodes for u in n.users)]
        bad = _unmatched(outputs, leaving, values)
        if bad is None:
            continue
        entering = [n for n in gm.graph.nodes if n not in nodes and n.op != "get_attr"
                    and any(u in nodes for u in n.users)]
        fed = _unmatched(inputs, entering, values)
        if fed is not None:
            node, detail = fed
            home = [p for p, _ in (node.meta.get("nn_module_stack") or {}).values()]
            owner = _path(home[-1]) if home else ""
            kinds = {n: type(m).__name__ for n, m in eager.named_modules()}
            return _Where(node.name, owner, kinds.get(owner, "input"), detail, f"{path} ({kind})")
        node, detail = bad
        return _Where(node.name, path, kind, detail)
    return None


def _eager_repeats(model: torch.nn.Module, calls: list[_Call], k: int) -> bool:
    """Whether two fresh eager copies, run through calls[:k + 1] from the same seeds, agree on call k."""
    def outputs() -> list:
        eager = _eager_copy(model, True)
        for call in calls[:k + 1]:
            out = pytree.tree_leaves(_seeded(lambda: eager(*call.args, **call.kwargs), call))
        return out
    return _compare(outputs(), outputs()) is None


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _unmatched(wanted: list[torch.Tensor], nodes: list[fx.Node], values: dict) -> tuple[fx.Node, str] | None:
    """The first eager tensor that has graph candidates (same shape and dtype) among ``nodes`` and
    none of them within tolerance: the closest candidate and how it differs."""
    for want in wanted:
        candidates = [n for n in nodes if _same_type(values.get(n), want)]
        if not candidates:
            continue
        errors = {n: _error(values[n], want) if want.is_floating_point() else
                  (0.0 if torch.equal(values[n], want) else float("inf")) for n in candidates}
        best = min(candidates, key=errors.get)
        if errors[best] > 1:
            return best, _differs(values[best], want) or "differs"
    return None


def _inside(gm: fx.GraphModule) -> dict[str, set[fx.Node]]:
    """Module path -> the graph nodes computed inside that module (its submodules included)."""
    inside: dict[str, set[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        for path, _ in (n.meta.get("nn_module_stack") or {}).values():
            inside.setdefault(_path(path), set()).add(n)
    return inside


def _path(path: str) -> str:
    """export writes ``layer1.0``; older exports ``L['self'].layer1.0``; symbolic_trace ``layer1.0``."""
    return path.removeprefix("L['self']").lstrip(".")


def _same_type(value: Any, want: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == want.shape and value.dtype == want.dtype


# --- the error ---------------------------------------------------------------------------------

def _message(captured: Captured, model: torch.nn.Module, calls: list[_Call], k: int, mismatch: _Mismatch) -> str:
    name = type(model).__name__
    lines = [f"the captured graph of {name} does not compute what its forward computes: on {calls[k].what}, "
             f"output {mismatch.index} {mismatch.detail} (train mode, the same seed on both{_rows_note(calls[k])})."]
    where = _locate(captured, model, calls, k)
    if where is not None:
        module = f"the model itself ({where.kind})" if not where.module else f"{where.module} ({where.kind})"
        role = f"computed in {module} and fed to {where.fed_to}" if where.fed_to else f"an output of {module}"
        lines.append(f"The first value that diverges is graph node '{where.node}', {role}: it {where.detail}.")
    if not _eager_repeats(model, calls, k):
        lines.append("Eager forward itself gives other outputs on two runs from the same torch seed: it draws "
                     "random numbers outside torch (numpy.random, Python's random) or reads the clock, and the "
                     "graph froze the one draw it saw. Draw them with torch (torch.rand, torch.bernoulli) so that "
                     "the graph draws them afresh on every call.")
    elif k == 0:
        lines.append("Capture recorded another computation than forward runs. Look there for a Python value "
                     "read during forward that is not a tensor input (an attribute or global set during forward, "
                     "Python's random, the clock), a buffer or input written in place and read again, or one "
                     "tensor passed as two inputs; pass such values as inputs or keep them in tensors.")
    else:
        lines.append("The example agrees, another batch does not: forward keeps something from one call to the "
                     "next that the graph froze at its value during capture, or decides on the values of the "
                     "inputs in Python. Keep state that changes in a buffer updated with in-place tensor ops "
                     "(register_buffer), pass it as an input, or make the decision with torch.where.")
    lines.append(_SKIP)
    return "\n".join(lines)
