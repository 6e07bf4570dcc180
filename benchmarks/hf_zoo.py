"""Hugging Face transformers models for the benchmarks, built from configs with random weights
(never from a hub): tiny ones, and GPT-2 small and BERT-base at full size. Each entry builds the
model and one batch of inputs as ``(args, kwargs)``, the way ``asteroid.compile`` takes them.

The module is not named after the package: benchmarks/ comes first on sys.path, and a
``transformers.py`` here would shadow the library."""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = dict(vocab=64, hidden=32, intermediate=64, blocks=4, heads=4, seq=16)
FULL_SEQ = 128  # tokens of the full-size examples: a short sequence keeps capture and costs quick


@dataclasses.dataclass(frozen=True)
class HFModel:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[int], tuple[tuple, dict]]  # inputs(batch) -> (args, kwargs)
    loss: Callable
    note: str  # what the config is, for the tables


def logits_loss(out, labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy of ``out["logits"]`` (a classifier's or a language model's, flattened)."""
    logits = out["logits"]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def _tokens(vocab: int, seq: int) -> Callable[[int], tuple[tuple, dict]]:
    def inputs(batch: int) -> tuple[tuple, dict]:
        return (torch.randint(0, vocab, (batch, seq)),), {}
    return inputs


def _tokens_and_mask(vocab: int, seq: int) -> Callable[[int], tuple[tuple, dict]]:
    def inputs(batch: int) -> tuple[tuple, dict]:
        pad = torch.randint(0, seq // 2, (batch, 1))  # padding at the end of each row
        mask = (torch.arange(seq)[None, :] < seq - pad).long()
        return (), {"input_ids": torch.randint(0, vocab, (batch, seq)), "attention_mask": mask}
    return inputs


def _images(size: int) -> Callable[[int], tuple[tuple, dict]]:
    def inputs(batch: int) -> tuple[tuple, dict]:
        return (torch.randn(batch, 3, size, size),), {}
    return inputs


def _gpt2(vocab, hidden, blocks, heads, positions):
    import transformers

    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=vocab, n_embd=hidden, n_layer=blocks, n_head=heads, n_positions=positions,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0,
        tie_word_embeddings=True))


def _bert(vocab, hidden, intermediate, blocks, heads, positions):
    import transformers

    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=blocks,
        num_attention_heads=heads, max_position_embeddings=positions, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _llama():
    import transformers

    t = TINY
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=t["vocab"], hidden_size=t["hidden"], intermediate_size=t["intermediate"],
        num_hidden_layers=t["blocks"], num_attention_heads=t["heads"], num_key_value_heads=2,
        max_position_embeddings=64, use_cache=False))


def _vit():
    import transformers

    t = TINY
    return transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=t["hidden"], intermediate_size=t["intermediate"],
        num_hidden_layers=t["blocks"], num_attention_heads=t["heads"], num_labels=5,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


_T = TINY
TINY_MODELS: dict[str, HFModel] = {m.name: m for m in (
    HFModel("hf-bert-tiny",
            lambda: _bert(_T["vocab"], _T["hidden"], _T["intermediate"], _T["blocks"], _T["heads"], 64),
            _tokens_and_mask(_T["vocab"], _T["seq"]), logits_loss,
            "BertForSequenceClassification, 4 blocks, hidden 32, with attention_mask"),
    HFModel("hf-gpt2-tiny", lambda: _gpt2(_T["vocab"], _T["hidden"], _T["blocks"], _T["heads"], 64),
            _tokens(_T["vocab"], _T["seq"]), logits_loss, "GPT2LMHeadModel, 4 blocks, hidden 32, tied head"),
    HFModel("hf-llama-tiny", _llama, _tokens(_T["vocab"], _T["seq"]), logits_loss,
            "LlamaForCausalLM, 4 blocks, hidden 32, 2 KV heads"),
    HFModel("hf-vit-tiny", _vit, _images(16), logits_loss, "ViTForImageClassification, 4 blocks, hidden 32, 16x16 images"),
)}

FULL_MODELS: dict[str, HFModel] = {m.name: m for m in (
    HFModel("hf-gpt2", lambda: _gpt2(50257, 768, 12, 12, 1024), _tokens(50257, FULL_SEQ), logits_loss,
            f"GPT2LMHeadModel, GPT-2 small (124M) config, tied head, {FULL_SEQ} tokens"),
    HFModel("hf-bert", lambda: _bert(30522, 768, 3072, 12, 12, 512), _tokens_and_mask(30522, FULL_SEQ), logits_loss,
            f"BertForSequenceClassification, BERT-base config, {FULL_SEQ} tokens with attention_mask"),
)}

MODELS = {**TINY_MODELS, **FULL_MODELS}
