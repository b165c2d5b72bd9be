"""Tiny random-init models and batches shared by the tests."""

from __future__ import annotations

import torch


def tiny_llama_config(
    layers: int = 4, hidden: int = 32, vocab: int = 128, tie: bool = False, attention_dropout: float = 0.0
):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        attention_dropout=attention_dropout,
    )


def tiny_llama(
    layers: int = 4,
    hidden: int = 32,
    vocab: int = 128,
    tie: bool = False,
    seed: int = 0,
    attention_dropout: float = 0.0,
):
    """A random-init LlamaForCausalLM; ``attention_dropout`` > 0 draws from the RNG in every training
    forward (what makes a resume test need the RNG restore)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(layers, hidden, vocab, tie, attention_dropout))
    model.config.use_cache = False
    return model


def lm_batches(n: int, batch: int = 4, seq: int = 16, vocab: int = 128, seed: int = 1, prompt: int = 0) -> list[dict]:
    """Learnable token sequences (repeating patterns) so the loss can fall; with ``prompt``, the first
    ``prompt`` labels of a row are -100 (row i: ``prompt + i % 2``: rows differ, pairs of rows count alike)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(0, vocab, (batch, 1), generator=g)
        step = torch.randint(1, 4, (batch, 1), generator=g)
        ids = (start + step * torch.arange(seq)) % vocab
        labels = ids.clone()
        for i in range(batch if prompt else 0):
            labels[i, : prompt + i % 2] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


POSITIVE = [
    "a wonderful and moving film",
    "great acting and a clever plot",
    "i loved every minute of it",
    "a delightful, funny story",
    "beautifully shot and well told",
    "an excellent cast at its best",
]
NEGATIVE = [
    "a dull and tedious mess",
    "the plot makes no sense at all",
    "i hated the boring script",
    "a tired, lifeless sequel",
    "badly acted and far too long",
    "an awful waste of good actors",
]


def write_sentiment(path, n: int, seed: int = 0) -> None:
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            lab = "positive" if i % 2 == 0 else "negative"
            text = rng.choice(POSITIVE if lab == "positive" else NEGATIVE)
            f.write(json.dumps({"text": text, "label": lab}) + "\n")


def make_model_dir(path, layers: int = 4, hidden: int = 32, tie: bool = False, attention_dropout: float = 0.0):
    """A tiny random-init LLaMA and a small byte-level BPE tokenizer saved as a Hugging Face directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = POSITIVE + NEGATIVE + ["Review:", "Sentiment:", " positive", " negative", "Question:", "Answer:"]
    tok.train_from_iterator(
        corpus * 4,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<eos>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    model = tiny_llama(layers=layers, hidden=hidden, vocab=len(fast), tie=tie, attention_dropout=attention_dropout)
    model.config.eos_token_id = fast.eos_token_id
    model.config.pad_token_id = fast.pad_token_id
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def per_block_adam_reference(model, data, opt, layers: int, device: str = "cpu") -> None:
    """Train ``model`` in place as LIFT's cyclic plan with ``optimizer_state: offload`` should: one
    persistent optimizer per layer, stepping in turn (the reference for the stash)."""
    blocks = [[p for n, p in model.named_parameters() if n.startswith(f"model.layers.{i}.")] for i in range(layers)]
    opts = [opt(ps) for ps in blocks]
    for k, b in enumerate(data):
        i = k % layers
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith(f"model.layers.{i}."))
        model(**{key: v.to(device) for key, v in b.items()}).loss.backward()
        opts[i].step()
        opts[i].zero_grad(set_to_none=True)
