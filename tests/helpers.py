"""Tiny random-init models and batches shared by the tests."""

from __future__ import annotations

import torch


def tiny_llama_config(layers: int = 4, hidden: int = 32, vocab: int = 128, tie: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )


def tiny_llama(layers: int = 4, hidden: int = 32, vocab: int = 128, tie: bool = False, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(layers, hidden, vocab, tie))
    model.config.use_cache = False
    return model


def lm_batches(n: int, batch: int = 4, seq: int = 16, vocab: int = 128, seed: int = 1) -> list[dict]:
    """Learnable token sequences (repeating patterns) so the loss can fall."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(0, vocab, (batch, 1), generator=g)
        step = torch.randint(1, 4, (batch, 1), generator=g)
        ids = (start + step * torch.arange(seq)) % vocab
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}
