"""Hugging Face transformers models, built from tiny configs (never from a hub), cut into real
stages: the values they build from sizes and buffers (position ids, rotary cos/sin, causal masks)
are recomputed by every stage that needs them, so every boundary between two transformer blocks
is an allowed cut; the planner's stages each compute; and training on the local
backend equals eager training with the same micro-batching. GPT-2's tied head is a tie: every
stage reading it holds a copy (tests/test_ties.py trains one across stages)."""

from __future__ import annotations

import os
import re

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import asteroid_fx as asteroid
from asteroid_fx.passes.linearize import linearize, node_cuts
from tests.eager import Call, assert_same_state, eager_train

BATCH, SEQ, VOCAB, BLOCKS = 8, 16, 64, 4
MICROBATCHES = 4
PRESET = "edge-4-1g"


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=BLOCKS,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   use_cache=False)
    return transformers.LlamaForCausalLM(cfg)


def _bert():
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=BLOCKS,
                                  num_attention_heads=4, max_position_embeddings=64, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg)


def _vit():
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=BLOCKS, num_attention_heads=4, num_labels=5,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.ViTForImageClassification(cfg)


def _gpt2(tied: bool):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=BLOCKS, n_head=4, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                                  bos_token_id=0, eos_token_id=0, tie_word_embeddings=tied)
    return transformers.GPT2LMHeadModel(cfg)


def _tokens(batch: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ))


def _padding_mask(batch: int) -> torch.Tensor:
    """Ones, then zeros for a random number of padded tokens at the end of each row."""
    pad = torch.randint(0, SEQ // 2, (batch, 1))
    return (torch.arange(SEQ)[None, :] < SEQ - pad).long()


def _lm_batch():
    return (_tokens(BATCH),), torch.randint(0, VOCAB, (BATCH, SEQ))


def _bert_batch():
    return Call((), {"input_ids": _tokens(BATCH), "attention_mask": _padding_mask(BATCH)}), torch.randint(0, 3, (BATCH,))


def _vit_batch():
    return (torch.randn(BATCH, 3, 16, 16),), torch.randint(0, 5, (BATCH,))


def _loss(out, labels: torch.Tensor) -> torch.Tensor:
    logits = out["logits"]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


# name -> (build, one batch of (inputs, labels)); inputs a tuple of positional tensors or a Call
MODELS = {
    "llama": (_llama, _lm_batch),
    "bert": (_bert, _bert_batch),
    "vit": (_vit, _vit_batch),
    "gpt2-untied": (lambda: _gpt2(False), _lm_batch),
}


def _compile_args(inputs) -> dict:
    if isinstance(inputs, Call):
        return {"example": inputs.args, "kwargs": inputs.kwargs}
    return {"example": inputs}


def _run_inputs(inputs):
    """What ``Compiled.run`` takes for one batch's inputs."""
    return (inputs.args, inputs.kwargs) if isinstance(inputs, Call) else inputs


def _block_of(node: torch.fx.Node) -> int | None:
    """The transformer block (``layers.3``, ``layer.3``, ``h.3``) a node's op comes from."""
    for path, _ in reversed(list(node.meta.get("nn_module_stack", {}).values())):
        found = re.search(r"(?:^|\.)(?:layers|layer|h)\.(\d+)$", path)
        if found:
            return int(found.group(1))
    return None


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    build, make_batch = MODELS[request.param]
    torch.manual_seed(0)
    model = build()
    inputs, _ = make_batch()
    compiled = asteroid.compile(model, PRESET, loss=_loss, stages=min(4, BLOCKS), microbatches=MICROBATCHES,
                                **_compile_args(inputs))
    return request.param, model, make_batch, compiled


def test_every_boundary_between_two_blocks_is_an_allowed_cut(case):
    name, _, _, compiled = case
    captured = compiled.captured
    fine = linearize(captured, max_layers=None)
    assert len(fine.allowed_cuts()) >= BLOCKS + 1, fine.blocked
    order = [n for n in captured.module.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    cuts = node_cuts(captured)
    blocks = [_block_of(n) for n in order]
    assert sorted(set(blocks) - {None}) == list(range(BLOCKS))
    for b in range(1, BLOCKS):
        first = blocks.index(b)
        assert cuts[first].allowed, (name, b, cuts[first].why_not)
        # what the next block gets from before it besides the hidden state is recomputed, not sent
        sent = set(cuts[first].values) - set(cuts[first].recomputed)
        assert all(captured.is_batched(n.meta["val"]) for n in order if n.name in sent)


def test_each_planned_stage_computes(case):
    """No sham stage: every stage of ``stages=4`` runs matrix products or convolutions (a block's
    part, or ViT's patch embedding), not only lookups and mask building."""
    name, _, _, compiled = case
    by_name = {n.name: n for n in compiled.captured.module.graph.nodes}
    lg = compiled.layer_graph
    assert len(compiled.stages) == min(4, BLOCKS)
    for st in compiled.stages:
        nodes = [by_name[x] for layer in lg.layers[st.layers[0]:st.layers[1]] for x in layer.nodes]
        flops = sum(n.meta["asteroid.stats"].flops_per_row for n in nodes if "asteroid.stats" in n.meta)
        assert flops > 0, (st.index, st.layers, [n.name for n in nodes][:8])
        assert any(_block_of(n) is not None for n in nodes) or st.index == 0, (st.index, st.layers)


def test_recomputed_buffers_are_copies_the_owner_saves(case):
    _, _, _, compiled = case
    owners: dict[str, int] = {}
    for st in compiled.stages:
        state = st.module.state_dict()
        for name in st.copies:
            assert name not in state and name not in st.owned
            assert not any(name == n for n, _ in st.module.named_parameters())
        for name in st.owned:
            assert name not in owners, f"{name} owned by stages {owners[name]} and {st.index}"
            owners[name] = st.index
    # every weight the graph reads has one owner stage (a buffer nothing reads, like Llama's
    # original_inv_freq, has none)
    assert set(owners) == {p for layer in compiled.layer_graph.layers for p in layer.params}


def test_trains_like_eager_with_adam(case):
    _, model, make_batch, compiled = case
    torch.manual_seed(1)
    batches = [make_batch() for _ in range(3)]

    def make_opt(params):
        return torch.optim.Adam(params, lr=1e-3)

    runner, losses = compiled.run([(_run_inputs(x), y) for x, y in batches], 3, optimizer=make_opt)
    ref, ref_losses = eager_train(model, batches, _loss, make_opt, microbatches=MICROBATCHES,
                                  rows=BATCH // MICROBATCHES)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    want = ref.state_dict()
    assert_same_state({k: v for k, v in runner.state_dict().items() if k in want}, want)


# --- GPT-2 with its tied head ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tied_gpt2():
    torch.manual_seed(0)
    model = _gpt2(True)
    inputs, _ = _lm_batch()
    return asteroid.compile(model, PRESET, example=inputs, loss=_loss, microbatches=MICROBATCHES)


def test_gpt2_tied_head_is_a_tie_not_a_blocked_cut(tied_gpt2):
    lg = tied_gpt2.layer_graph
    assert {"transformer.wte.weight", "lm_head.weight"} in [set(t.names) for t in lg.ties if t.kind == "param"]
    blocked = {c.why_not for c in node_cuts(tied_gpt2.captured)[1:-1] if not c.allowed}
    assert not any("wte" in why or "lm_head" in why for why in blocked), blocked


def test_gpt2_tied_head_allows_a_cut_between_every_two_blocks(tied_gpt2):
    cuts = node_cuts(tied_gpt2.captured)
    order = [n for n in tied_gpt2.captured.module.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    blocks = [_block_of(n) for n in order]
    assert all(cuts[blocks.index(b)].allowed for b in range(1, BLOCKS))


def test_onnxruntime_check_passes(case):
    # every stage exported to ONNX and run by ONNX Runtime agrees with the local backend and eager
    # forward (recomputed position ids, rotary tables and masks included)
    pytest.importorskip("onnxruntime")
    name, model, make_batch, compiled = case
    inputs, _ = make_batch()
    run = _run_inputs(inputs)
    args, kwargs = run if isinstance(inputs, Call) else (run, None)
    report = compiled.check(inputs=args, kwargs=kwargs, model=model, repeats=0)
    assert report.ok, report
    assert report.ort_vs_eager.elements > 0


def test_onnxruntime_check_passes_with_the_tied_head_across_stages():
    # the head's copy of the tied embedding is an initializer of the last stage's ONNX graph
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = _gpt2(True)
    inputs, _ = _lm_batch()
    compiled = asteroid.compile(model, PRESET, example=inputs, loss=_loss, stages=3, microbatches=MICROBATCHES)
    assert len(compiled.program.stages) == 3 and compiled.layer_graph.ties
    report = compiled.check(inputs=inputs, model=model, repeats=0)
    assert report.ok, report
