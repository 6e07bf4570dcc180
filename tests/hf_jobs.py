"""Hugging Face transformers models as jobs (tiny configs, random weights, never from a hub), for
worker-process runs: every worker imports this module and builds the same model from the run's
seed. Tokens and next-token labels are drawn per sample from a generator of its own."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from asteroid_fx.runtime.job import Job

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BATCH, SEQ, VOCAB, BLOCKS, SAMPLES = 8, 16, 64, 4, 24


class Tokens(torch.utils.data.Dataset):
    """Sample i: SEQ random tokens, and as its label the same sequence shifted by one."""

    def __len__(self):
        return SAMPLES

    def __getitem__(self, i):
        seq = torch.randint(0, VOCAB, (SEQ + 1,), generator=torch.Generator().manual_seed(7 + i))
        return seq[:-1], seq[1:]


def lm_loss(out, labels):
    logits = out["logits"]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def _gpt2():
    import transformers

    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=BLOCKS, n_head=4, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                                  bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    return transformers.GPT2LMHeadModel(cfg)


def _llama():
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=BLOCKS,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   use_cache=False)
    return transformers.LlamaForCausalLM(cfg)


def _job(model) -> Job:
    # Adam's eps above the rounding noise: attention's key bias has a gradient that is zero in exact
    # arithmetic (softmax ignores a shift shared by every key), and with the default eps Adam
    # scales that noise, different in every summation order, into full-size steps
    return Job(model=model, dataset=Tokens(), loss=lm_loss, batch=BATCH, example=torch.zeros(BATCH, SEQ, dtype=torch.long),
               optimizer="Adam", lr=1e-3, optimizer_kwargs={"eps": 1e-6}, shuffle=False)


def gpt2() -> Job:
    """GPT-2 with its head tied to the token embedding."""
    return _job(_gpt2)


def llama() -> Job:
    return _job(_llama)
