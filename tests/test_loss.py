"""lift.loss: the chunked linear cross-entropy equals the model's own loss and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import lift_ds
from lift_ds.errors import ConfigError
from lift_ds.loss import (
    SUPPORTED_MODEL_TYPES,
    install_loss,
    installed_loss,
    linear_cross_entropy_sum,
    remove_loss,
    unsupported_reason,
)

from helpers import lm_batches, tiny_llama

TOL = {torch.float32: 2e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def _grads(tensors):
    out = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("defer", [False, True])
@pytest.mark.parametrize("n", [37, 5])
def test_function_equals_cross_entropy_of_the_full_logits(dtype, defer, n):
    """37 rows: 6 chunks of 7, the last one short, the weight gradient summed in fp32; 5 rows: the
    weight gradient from the kept logits gradients in one matmul."""
    g = torch.Generator().manual_seed(0)
    hidden, vocab = 16, 101
    h = torch.randn(n, hidden, generator=g).to(dtype).requires_grad_()
    w = (0.3 * torch.randn(vocab, hidden, generator=g)).to(dtype).requires_grad_()
    b = torch.randn(vocab, generator=g).to(dtype).requires_grad_()
    t = torch.randint(0, vocab, (n,), generator=g)
    ref = F.cross_entropy(F.linear(h, w, b).float(), t, reduction="sum")
    (0.37 * ref).backward()  # a scaled loss: backward must scale what forward stored
    want = _grads((h, w, b))
    got_loss = linear_cross_entropy_sum(h, w, b, t, rows=7 if n > 7 else 2, defer=defer)
    (0.37 * got_loss).backward()
    got = _grads((h, w, b))
    assert got_loss.dtype == torch.float32
    assert abs(got_loss.item() - ref.item()) <= 1e-6 * abs(ref.item())
    for name, x, y in zip("hwb", got, want):
        assert x.dtype == y.dtype, name
        err = (x.float() - y.float()).abs().max() / y.float().abs().max()
        assert err <= TOL[dtype], (name, err.item())


def test_function_is_exact_where_the_target_probability_underflows():
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(6, 8, generator=g), 40 * torch.randn(50, 8, generator=g)  # gaps of hundreds of nats
    t = torch.randint(0, 50, (6,), generator=g)
    want = F.cross_entropy(F.linear(h, w), t, reduction="sum")
    assert want.item() > 500
    assert torch.allclose(linear_cross_entropy_sum(h, w, None, t), want, rtol=1e-6)


def test_no_gradient_work_without_autograd():
    h, w, t = torch.randn(5, 4), torch.randn(9, 4, requires_grad=True), torch.randint(0, 9, (5,))
    with torch.no_grad():
        out = linear_cross_entropy_sum(h, w, None, t)
    assert not out.requires_grad and torch.allclose(out, F.cross_entropy(F.linear(h, w), t, reduction="sum"))


# --------------------------------------------------------------------------- models


def _tiny(kind: str, tie: bool):
    """A tiny random-init causal LM of a supported model type (None when transformers lacks it)."""
    import transformers

    if kind == "llama":
        return tiny_llama(layers=3, vocab=97, tie=tie)
    names = {
        "mistral": "Mistral",
        "qwen2": "Qwen2",
        "qwen3": "Qwen3",
        "gemma": "Gemma",
        "phi3": "Phi3",
        "olmo2": "Olmo2",
        "smollm3": "SmolLM3",
        "starcoder2": "Starcoder2",
    }
    cfg_cls, model_cls = (
        getattr(transformers, f"{names[kind]}Config", None),
        getattr(transformers, f"{names[kind]}ForCausalLM", None),
    )
    if cfg_cls is None or model_cls is None:
        return None
    cfg = cfg_cls(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return model_cls(cfg)


def _labels(ids: torch.Tensor, shape: str) -> torch.Tensor:
    labels = ids.clone()
    if shape == "classification":  # only the last one or two tokens count, at different positions per row
        labels[:] = -100
        labels[0, 9:11], labels[1, 6], labels[2, 10] = ids[0, 9:11], ids[1, 6], ids[2, 10]
    return labels


def _run(model, ids, labels, **kw):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_equal_losses(model, ids, labels, **kw):
    remove_loss(model)
    want_out, want = _run(model, ids, labels, **kw)
    assert install_loss(model, "chunked") == "chunked"
    got_out, got = _run(model, ids, labels, **kw)
    remove_loss(model)
    assert got_out.logits is None and want_out.logits is not None
    assert abs(got_out.loss.item() - want_out.loss.item()) <= 1e-6 * abs(want_out.loss.item()), (
        got_out.loss,
        want_out.loss,
    )
    assert sorted(got) == sorted(want) and want
    for n in want:
        err = (got[n] - want[n]).abs().max() / want[n].abs().max().clamp(min=1e-12)
        assert err < 1e-5, (n, err.item())


@pytest.mark.parametrize("kind", SUPPORTED_MODEL_TYPES)
def test_every_supported_model_type_gives_its_own_loss_and_gradients(kind):
    model = _tiny(kind, tie=False)
    if model is None:
        pytest.skip(f"transformers has no {kind}")
    assert unsupported_reason(model) is None
    ids = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(2))
    for p in model.parameters():
        p.requires_grad_(True)
    _assert_equal_losses(model, ids, _labels(ids, "text"))


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("active", ["model.layers.1.", "head", "model.embed_tokens.", "model.norm."])
@pytest.mark.parametrize("shape", ["text", "classification"])
def test_lift_blocks_get_the_models_gradients(tie, active, shape):
    """LIFT's cases: a middle layer, the head (its weight tied to the embedding or not), the embedding."""
    model = tiny_llama(layers=3, vocab=97, tie=tie)
    prefixes = ("lm_head.", "model.norm.") if active == "head" else (active,)
    if active == "head" and tie:
        prefixes += ("model.embed_tokens.",)  # the head's weight is the embedding's
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(prefixes))
    ids = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(3))
    _assert_equal_losses(model, ids, _labels(ids, shape))


def test_num_items_in_batch_and_shift_labels_as_transformers_passes_them():
    model = tiny_llama(layers=2, vocab=97)
    ids = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(4))
    labels = _labels(ids, "classification")
    _assert_equal_losses(model, ids, labels, num_items_in_batch=torch.tensor(11))
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    remove_loss(model)
    model.zero_grad(set_to_none=True)
    want = model(input_ids=ids, labels=labels).loss
    install_loss(model, "chunked")
    got = model(input_ids=ids, shift_labels=shifted, labels=None).loss
    remove_loss(model)
    assert torch.allclose(got, want, rtol=1e-6)


def test_head_runs_once_as_a_module_and_other_calls_keep_the_models_forward():
    """The head is called as a module (what ZeRO-3's gather hooks and FSDP need), once per forward;
    without autograd, without labels or with logits_to_keep the model's own forward runs (logits)."""
    model = tiny_llama(layers=2, vocab=97)
    install_loss(model, "chunked")
    calls = []
    model.lm_head.register_forward_pre_hook(lambda m, a: calls.append(len(a)))
    ids = torch.randint(0, 97, (2, 10))
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None and out.loss.requires_grad and calls == [2]  # (hidden states, targets)
    assert "forward" not in model.lm_head.__dict__  # the swapped forward is put back
    with torch.no_grad():
        ref = model(input_ids=ids, labels=ids)
    assert (
        ref.logits is not None
        and ref.logits.shape == (2, 10, 97)
        and torch.allclose(ref.loss, out.loss.detach(), rtol=1e-6)
    )
    assert model(input_ids=ids).logits.shape == (2, 10, 97)
    assert model(ids, None, None, None, None, ids).logits is None  # positional labels
    assert model(input_ids=ids, logits_to_keep=1).logits.shape == (2, 1, 97)
    remove_loss(model)
    assert installed_loss(model) is None and model(input_ids=ids, labels=ids).logits is not None


def test_peft_lora_model():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_llama(layers=2, vocab=97), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    for n, p in model.named_parameters():  # LoRA's B starts at zero: move it so every gradient is exercised
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(5))
    _assert_equal_losses(model, ids, _labels(ids, "text"))


def test_models_it_cannot_serve():
    from transformers import LlamaForSequenceClassification

    from helpers import tiny_llama_config

    cfg = tiny_llama_config(layers=2, vocab=97)
    cfg.num_labels, cfg.pad_token_id = 2, 0
    head = LlamaForSequenceClassification(cfg)
    assert "not a Hugging Face causal LM" in unsupported_reason(head)
    assert install_loss(head, "auto") is None and installed_loss(head) is None
    with pytest.raises(ValueError, match="lift.loss"):
        install_loss(head, "chunked")
    capped = tiny_llama(layers=2, vocab=97)
    capped.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in unsupported_reason(capped)
    cfg = {"train_micro_batch_size_per_gpu": 2, "lift": {"backend": "torch", "total_steps": 2, "loss": "chunked"}}
    with pytest.raises(ConfigError, match="lift.loss"):
        lift_ds.initialize(model=head, config=cfg, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_lift_run_is_the_same_with_either_loss(precision):
    """The torch backend over embedding (tied with the head), layers and head: the same weights after
    8 steps with the model's own loss and with lift_ds's (fp32 to float noise; bf16 to bf16's)."""
    finals = {}
    for mode in ("model", "chunked"):
        model = tiny_llama(layers=3, vocab=97, tie=True)
        cfg = {
            "train_micro_batch_size_per_gpu": 4,
            "gradient_clipping": 0.0,
            "lift": {
                "backend": "torch",
                "total_steps": 8,
                "include_embedding": True,
                "include_head": True,
                "policy": "cyclic",
                "loss": mode,
            },
        }
        if precision == "bf16":
            cfg["bf16"] = {"enabled": True}
        engine, *_ = lift_ds.initialize(model=model, config=cfg, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5))
        assert installed_loss(model) == (None if mode == "model" else mode)
        for b in lm_batches(8, batch=4, seq=12, vocab=97):
            engine.backward(engine(**b).loss)
            engine.step()
        finals[mode] = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        engine.close()
    start = {n: p.detach().float() for n, p in tiny_llama(layers=3, vocab=97, tie=True).named_parameters()}
    for n, want in finals["model"].items():
        moved, size = (want - start[n]).abs().max().item(), want.abs().max().item()
        assert moved > 0 or precision == "bf16", n  # (bf16: an update below half an ulp of 1.0 leaves a norm weight)
        # fp32: a few ulps of the weight and 1e-4 of how far it moved; bf16: four ulps of its largest element
        tol = 1e-6 * size + 1e-4 * moved if precision == "fp32" else 2**-6 * size
        assert (finals["chunked"][n] - want).abs().max() <= tol, n


def test_default_is_auto_and_model_keeps_logits():
    model = tiny_llama(layers=2, vocab=97)
    cfg = {"train_micro_batch_size_per_gpu": 2, "lift": {"backend": "torch", "total_steps": 2}}
    engine, *_ = lift_ds.initialize(model=model, config=cfg, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    assert engine.lift.loss == "auto" and installed_loss(model) == "auto"
    b = lm_batches(1, batch=2, seq=8, vocab=97)[0]
    assert engine(**b).logits is None
    engine.close()
    engine, *_ = lift_ds.initialize(
        model=model,
        config=copy.deepcopy({**cfg, "lift": {**cfg["lift"], "loss": "model"}}),
        optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1),
    )
    assert installed_loss(model) is None and engine(**b).logits is not None
    engine.close()


# --------------------------------------------------------------------------- evaluation


def _old_eval(model, data, examples, tok):
    """Evaluation as it was before: log-softmax over every position's logits."""
    from lift_ds.data import collate

    total = count = 0.0
    for i in range(len(data.input_ids)):
        b = collate([(data.input_ids[i], data.labels[i])], tok.pad_token_id)
        logp = torch.log_softmax(model(input_ids=b["input_ids"]).logits.float(), -1)[0, :-1]
        lab = b["labels"][0, 1:]
        m = lab != -100
        total -= logp[m].gather(1, lab[m][:, None]).sum().item()
        count += m.sum().item()
    scores = []
    for ex in examples:
        p = tok(ex.prompt, add_special_tokens=False)["input_ids"]
        row = []
        for choice in ex.choices:
            r = tok(choice, add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + r])).logits.float(), -1)[0]
            row.append(sum(logp[len(p) - 1 + k, t].item() for k, t in enumerate(r)))
        scores.append(row)
    return total / count, scores


@pytest.mark.parametrize("keep", [True, False])
def test_evaluation_scores_only_the_positions_it_needs(tmp_path, keep):
    """Loss and choice log-likelihoods equal those from every position's logits; the forward is asked
    for the scored positions only (``logits_to_keep``), or (a forward without it) sliced after."""
    from lift_ds.evaluate import choice_accuracy, eval_loss
    from lift_ds.recipe import load_task_data, load_tokenizer

    from helpers import make_model_dir, write_sentiment

    make_model_dir(tmp_path / "m")
    write_sentiment(tmp_path / "d.jsonl", 10)
    tok = load_tokenizer(str(tmp_path / "m"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    task = load_task_data(str(tmp_path / "d.jsonl"), str(tmp_path / "d.jsonl"), "classification", tok, 64)
    asked = []

    def forward(**kw):
        asked.append((kw.get("logits_to_keep"), kw["input_ids"].shape[1]))
        return model(**kw)

    fwd = model if keep else forward
    hook = (
        model.register_forward_pre_hook(
            lambda m, a, kw: asked.append((kw.get("logits_to_keep"), kw["input_ids"].shape[1])), with_kwargs=True
        )
        if keep
        else None
    )
    got_loss = eval_loss(fwd, task.held, 4, 0, 1, tok.pad_token_id)["eval_loss"]
    lls: list = []
    choice_accuracy(fwd, task.held_examples, tok, 64, 4, 0, 1, loglikelihoods=lls)
    if hook is not None:
        hook.remove()
    want_loss, want_lls = _old_eval(model, task.held, task.held_examples, tok)
    assert abs(got_loss - want_loss) <= 1e-5 * want_loss
    assert torch.allclose(torch.tensor(lls), torch.tensor(want_lls), rtol=1e-5, atol=1e-5)
    if keep:  # the label words' positions (a few tokens), not the whole review
        assert asked and all(torch.is_tensor(k) and 0 < len(k) < seq for k, seq in asked), asked
        assert sum(len(k) for k, _ in asked) < 0.4 * sum(seq for _, seq in asked)
    else:
        assert asked and all(k is None for k, _ in asked)


def test_lift_trainer_trains_through_the_chunked_loss(tmp_path):
    """Trainer.compute_loss -> the engine -> the model's forward: the head gets (hidden states, targets)
    and the weights equal those of the model's own loss."""
    from transformers import TrainingArguments

    from lift_ds.integrations.transformers import LiftTrainer

    rows = [
        {"input_ids": b["input_ids"][0].tolist(), "labels": b["labels"][0].tolist()}
        for b in lm_batches(16, batch=1, prompt=6)
    ]
    finals = {}
    for mode in ("model", "chunked"):
        model = tiny_llama(tie=True)
        calls = []
        model.lm_head.register_forward_pre_hook(lambda m, a: calls.append(len(a)))  # noqa: B023 (the hook fires in this iteration)
        args = TrainingArguments(
            output_dir=str(tmp_path / mode),
            per_device_train_batch_size=2,
            max_steps=6,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            learning_rate=1e-2,
            save_strategy="no",
            adam_epsilon=1e-3,
        )
        trainer = LiftTrainer(
            model=model,
            args=args,
            train_dataset=rows,
            data_collator=lambda r: {k: torch.tensor([x[k] for x in r]) for k in r[0]},
            lift_config={
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "lift": {"backend": "torch", "include_head": True, "loss": mode},
            },
        )
        trainer.train()
        assert calls == [2 if mode == "chunked" else 1] * 6
        finals[mode] = {n: p.detach().clone() for n, p in model.named_parameters()}
    start = dict(tiny_llama(tie=True).named_parameters())
    for n, want in finals["model"].items():
        moved = (want - start[n]).abs().max()
        assert (finals["chunked"][n] - want).abs().max() <= 1e-4 * moved + 1e-7, n


def test_a_forward_installed_before_is_kept_and_restored():
    """TRL's SFTTrainer installs its own fused head on the instance first; calls asking for it reach it,
    and removing lift_ds's loss puts it back."""
    import types

    model = tiny_llama(layers=2, vocab=97)
    seen = []
    own = model.forward

    def theirs(self, *a, fused_lm_head=False, **kw):
        seen.append(fused_lm_head)
        return own(*a, **kw)

    model.forward = types.MethodType(theirs, model)
    before = model.forward
    install_loss(model, "chunked")
    ids = torch.randint(0, 97, (2, 8))
    assert model(input_ids=ids, labels=ids, fused_lm_head=True).logits is not None and seen == [True]
    assert model(input_ids=ids, labels=ids).logits is None
    remove_loss(model)
    assert model.forward == before
