"""BERT-style encoder classifier (Devlin et al. 2019, "BERT: Pre-training of Deep
Bidirectional Transformers for Language Understanding").

Token + learned position + segment embeddings with LayerNorm, N post-LayerNorm
encoder blocks (multi-head self-attention, GELU MLP), and a tanh pooler plus a
classifier on the first ([CLS]) token. Attention is written with plain
matmul/softmax so that every op is visible to the graph compiler. The full config
is BERT-base (12 layers, hidden 768, 12 heads, 30522-token vocabulary).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import nn


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    max_positions: int = 512
    type_vocab_size: int = 2
    num_labels: int = 2
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    seq_len: int = 128  # only used by example()


FULL = BertConfig()
SMALL = BertConfig(
    vocab_size=64,
    hidden=32,
    layers=2,
    heads=2,
    intermediate=64,
    max_positions=16,
    num_labels=2,
    dropout=0.0,
    seq_len=16,
)


class SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        if cfg.hidden % cfg.heads:
            raise ValueError(f"hidden={cfg.hidden} is not divisible by heads={cfg.heads}")
        self.heads = cfg.heads
        self.head_dim = cfg.hidden // cfg.heads
        self.query = nn.Linear(cfg.hidden, cfg.hidden)
        # no key bias: it adds the same q.b to every score of a query, which softmax cancels, so its
        # gradient is exactly zero and only rounding noise would ever move it
        self.key = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        self.value = nn.Linear(cfg.hidden, cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.hidden)
        self.attn_drop = nn.Dropout(cfg.dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, D) -> (B, H, T, Dh); unflatten avoids naming the batch size.
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask_bias: Optional[torch.Tensor]) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        if mask_bias is not None:
            scores = scores + mask_bias
        probs = self.attn_drop(scores.softmax(dim=-1))
        return self.out((probs @ v).transpose(1, 2).flatten(2))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.attn_drop = nn.Dropout(cfg.dropout)
        self.ln1 = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.hidden, cfg.intermediate),
            nn.GELU(),
            nn.Linear(cfg.intermediate, cfg.hidden),
            nn.Dropout(cfg.dropout),
        )
        self.ln2 = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask_bias: Optional[torch.Tensor]) -> torch.Tensor:
        # Post-LN residuals, as in the original BERT / Transformer.
        x = self.ln1(x + self.attn_drop(self.attn(x, mask_bias)))
        return self.ln2(x + self.mlp(x))


class Bert(nn.Module):
    def __init__(self, cfg: BertConfig = FULL) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.pos_emb = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.seg_emb = nn.Embedding(cfg.type_vocab_size, cfg.hidden)
        self.emb_ln = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))
        self.pooler = nn.Linear(cfg.hidden, cfg.hidden)
        self.cls_drop = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden, cfg.num_labels)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        # Truncation aside, this is BERT's N(0, 0.02) initialisation.
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        t = input_ids.size(1)
        # Slicing the position table equals looking up arange(T) without creating a tensor.
        x = self.tok_emb(input_ids) + self.pos_emb.weight[:t]
        if token_type_ids is None:
            # All-zero segment ids reduce to adding row 0 of the segment table.
            x = x + self.seg_emb.weight[0]
        else:
            x = x + self.seg_emb(token_type_ids)
        x = self.emb_drop(self.emb_ln(x))
        mask_bias = None
        if attention_mask is not None:
            # Additive bias (B, 1, 1, T): 0 where attended, dtype-min where padded; a finite
            # minimum keeps fully padded rows NaN-free.
            keep = attention_mask[:, None, None, :].to(x.dtype)
            mask_bias = (1.0 - keep) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, mask_bias)
        pooled = torch.tanh(self.pooler(x[:, 0]))
        return self.classifier(self.cls_drop(pooled))


def config(small: bool = False, **overrides) -> BertConfig:
    return replace(SMALL if small else FULL, **overrides)


def build(small: bool = False, **overrides) -> Bert:
    return Bert(config(small, **overrides))


def example(cfg: BertConfig, batch: int) -> tuple[torch.Tensor, ...]:
    t = cfg.seq_len
    input_ids = torch.randint(0, cfg.vocab_size, (batch, t))
    # Right-padded rows of random length (at least half the sequence) exercise the mask.
    lengths = torch.randint(t // 2 + 1, t + 1, (batch, 1))
    attention_mask = (torch.arange(t)[None, :] < lengths).long()
    return input_ids, attention_mask


def labels(cfg: BertConfig, batch: int) -> torch.Tensor:
    return torch.randint(0, cfg.num_labels, (batch,))
