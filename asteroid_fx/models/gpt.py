"""GPT-style decoder language model (Radford et al. 2019, "Language Models are
Unsupervised Multitask Learners", i.e. GPT-2).

Token + learned position embeddings, pre-LayerNorm blocks with causal multi-head
self-attention (plain matmul/softmax) and a GELU MLP, a final LayerNorm and a linear
LM head. The full config is GPT-2 small (12 layers, 768 wide, 12 heads, 1024
context, 50257 tokens). GPT-2 ties the head to the token embedding; here that is the
``tie_weights`` option, off by default so the two can live on different pipeline stages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    n_ctx: int = 1024
    d_model: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: int = 4
    dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    tie_weights: bool = False
    seq_len: int = 128  # only used by example()/labels()


FULL = GPTConfig()
SMALL = GPTConfig(vocab_size=64, n_ctx=16, d_model=32, layers=2, heads=2, dropout=0.0, seq_len=16)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.heads:
            raise ValueError(f"d_model={cfg.d_model} is not divisible by heads={cfg.heads}")
        self.heads = cfg.heads
        self.head_dim = cfg.d_model // cfg.heads
        self.query = nn.Linear(cfg.d_model, cfg.d_model)
        # no key bias: it shifts every score of a query by the same q.b, which softmax cancels, so
        # its gradient is exactly zero and only rounding noise would ever move it
        self.key = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.value = nn.Linear(cfg.d_model, cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.attn_drop = nn.Dropout(cfg.dropout)
        self.resid_drop = nn.Dropout(cfg.dropout)
        # Non-persistent: derivable from n_ctx, so it stays out of checkpoints.
        causal = torch.tril(torch.ones(cfg.n_ctx, cfg.n_ctx, dtype=torch.bool))
        self.register_buffer("mask", causal[None, None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.size(1)
        q, k, v = (
            y.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
            for y in (self.query(x), self.key(x), self.value(x))
        )
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        # The diagonal is always kept, so no row is fully masked and -inf is safe.
        scores = scores.masked_fill(~self.mask[:, :, :t, :t], float("-inf"))
        probs = self.attn_drop(scores.softmax(dim=-1))
        return self.resid_drop(self.proj((probs @ v).transpose(1, 2).flatten(2)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.ln1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(d, cfg.mlp_ratio * d),
            nn.GELU(approximate="tanh"),  # GPT-2 used the tanh approximation
            nn.Linear(cfg.mlp_ratio * d, d),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig = FULL) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.n_ctx, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)
        for block in self.blocks:
            # GPT-2 scales residual-branch outputs by 1/sqrt(2 * layers) so the
            # residual stream's variance does not grow with depth.
            for lin in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(lin.weight, 0.0, 0.02 / math.sqrt(2 * cfg.layers))
        if cfg.tie_weights:
            self.lm_head.weight = self.tok_emb.weight

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.size(1)
        # Slicing the position table equals looking up arange(T) without creating a tensor.
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb.weight[:t])
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def config(small: bool = False, **overrides) -> GPTConfig:
    return replace(SMALL if small else FULL, **overrides)


def build(small: bool = False, **overrides) -> GPT:
    return GPT(config(small, **overrides))


def example(cfg: GPTConfig, batch: int) -> tuple[torch.Tensor, ...]:
    return (torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len)),)


def labels(cfg: GPTConfig, batch: int) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Token-level cross entropy averaged over every token of every row.

    Rows all have T tokens, so this is also the mean of per-row means, which keeps
    chunked (micro-batch) losses additive when weighted by rows / batch.
    """
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
