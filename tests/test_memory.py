from pathlib import Path

import pytest

from lift_ds import memory


@pytest.fixture(scope="module")
def smol():
    return memory.model_shape("smollm2-135m")


def test_parameter_counts_match_the_real_model(smol):
    assert smol.total == 134_515_008  # SmolLM2-135M, tied embeddings counted once
    assert smol.num_layers == 30 and len(set(smol.layer_sizes)) == 1
    assert smol.embedding == 49152 * 576 and smol.head == 576  # the head is the final norm (lm_head is tied)
    assert smol.total == smol.embedding + sum(smol.layer_sizes) + smol.head


def test_lift_vs_full_ratios_match_the_arithmetic(smol):
    def ratio(zero):
        lift, full, _ = memory.table(smol, 2, zero)
        return full.model_states / lift.model_states

    assert ratio(2) == pytest.approx(4.12, abs=0.02)  # bf16 + fp32 master and Adam: 2P + 14P/N vs 2P + 14B/N
    assert ratio(3) == pytest.approx(6.76, abs=0.02)


def test_accounting_by_stage(smol):
    P, B = smol.total, max(smol.layer_sizes)
    e = {z: memory.estimate(smol, "lift", 4, z) for z in range(4)}
    assert (e[0].params, e[0].grads, e[0].optimizer) == (2 * P, 2 * B, 12 * B)
    assert (e[1].params, e[1].grads, e[1].optimizer) == (2 * P, 2 * B, 3 * B)
    assert (e[2].params, e[2].grads, e[2].optimizer) == (2 * P, B / 2, 3 * B)
    assert (e[3].params, e[3].grads, e[3].optimizer) == (P / 2, B / 2, 3 * B)
    fp32 = memory.estimate(smol, "full", 1, 0, precision="fp32")
    assert (fp32.params, fp32.grads, fp32.optimizer) == (4 * P, 4 * P, 8 * P)
    off = memory.estimate(smol, "full", 2, 2, offload=True)
    assert off.model_states == off.params + off.grads


def test_deepspeed_formulas_for_full_fine_tuning(smol):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    P = smol.total
    largest = max(smol.layer_sizes + [smol.embedding, smol.head])
    for nodes, per_node in ((1, 2), (2, 8)):
        assert (
            memory.deepspeed_full_estimate(smol, per_node, nodes, 2, False)
            == estimate_zero2_model_states_mem_needs(P, per_node, nodes, cpu_offload=False)[1]
        )
        assert (
            memory.deepspeed_full_estimate(smol, per_node, nodes, 3, False)
            == estimate_zero3_model_states_mem_needs(P, largest, per_node, nodes, cpu_offload=False)[1]
        )


def test_seven_b_full_fine_tuning_needs_about_112_gb():
    s = memory.model_shape("llama-2-7b")
    full = memory.estimate(s, "full", 2, 3)
    assert 105e9 < 2 * full.model_states < 112e9  # 16 bytes per parameter over the two ranks
    lift = memory.estimate(s, "lift", 2, 3)
    assert lift.model_states < 10 * memory.GIB


def test_lora_counts_adapters(smol):
    lora = memory.estimate(smol, "lora", 2, 2, lora_r=8)
    # q, k, v, o on 30 layers: r * (in + out) each
    per_layer = 8 * ((576 + 576) + (576 + 192) * 2 + (576 + 576))
    assert lora.trained == 30 * per_layer


def test_largest_fitting_and_cli(capsys, tmp_path):
    fit = memory.largest_fitting(24, 2, 3)
    assert fit["lift"] in memory.PRESETS and fit["full"] == "smollm2-135m"
    assert memory.main(["--model", "smollm2-135m", "--ranks", "2", "--zero", "2"]) == 0
    out = capsys.readouterr().out
    assert "| lift |" in out and "full / LIFT: 4.12x" in out and "DeepSpeed's own estimate" in out
    assert memory.main(["--model", str(tmp_path / "nope")]) == 2
    assert "neither a file, a directory, nor a preset" in capsys.readouterr().err


def test_config_directory(tmp_path):
    from helpers import tiny_llama

    tiny_llama(layers=3).config.save_pretrained(tmp_path)
    s = memory.model_shape(str(tmp_path))
    assert s.num_layers == 3 and s.total == sum(p.numel() for p in tiny_llama(layers=3).parameters())
    assert memory.model_shape(str(tmp_path / "config.json")).total == s.total
    with pytest.raises(ValueError, match="method must be"):
        memory.estimate(s, "adapter", 2, 2)


def test_quantized_frozen_weights_arithmetic():
    """Q-LIFT / QLoRA estimate: the decoder layers' frozen linear weights at 4.127 bits (NF4) or a
    byte (int8); the active block, norms, embeddings and head stay 16-bit."""
    s = memory.model_shape("llama-2-7b")
    lift = memory.estimate(s, "lift", 1, 0)
    nf4 = memory.estimate(s, "lift", 1, 0, frozen_weights="nf4")
    block_linear = min(max(s.candidate_sizes), s.layer_linear)
    assert nf4.params == (s.layer_linear - block_linear) * 4.127 / 8 + (s.total - s.layer_linear + block_linear) * 2
    # embeddings, head stay 16-bit
    assert nf4.optimizer == lift.optimizer and nf4.grads == lift.grads and nf4.params < 0.35 * lift.params
    qlora = memory.estimate(s, "lora", 1, 0, frozen_weights="int8")
    assert qlora.params == s.layer_linear * 1.0 + (s.total - s.layer_linear) * 2
    with pytest.raises(ValueError, match="frozen_weights 'nf4'"):
        memory.estimate(s, "full", 1, 0, frozen_weights="nf4")


def test_one_gpu_table(capsys):
    assert memory.main(["--one_gpu"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (
        "| method | llama-2-7b | llama-3-8b | llama-2-70b | llama-3-70b | fits 80 GiB | fits 48 GiB | fits 24 GiB "
        "| fits 12 GiB |"
    )
    nf4 = next(line for line in out.splitlines() if line.startswith("| LIFT-NF4 |"))
    assert nf4.endswith(
        "| llama-2-7b, llama-3-8b, llama-2-70b, llama-3-70b | llama-2-7b, "
        "llama-3-8b | llama-2-7b, llama-3-8b | llama-2-7b, llama-3-8b |"
    )
    streamed = next(line for line in out.splitlines() if line.startswith("| LIFT-NF4 streamed, AdamW8bit |"))
    assert streamed.endswith(
        "| llama-2-7b, llama-3-8b, llama-2-70b, llama-3-70b | llama-2-7b, llama-3-8b, llama-2-70b |"
    )
    assert "| full fine-tuning |" in out and out.count("none") >= 4
    docs = Path(__file__).resolve().parents[1] / "docs"
    for page in ("hardware.md", "streaming.md"):  # the pages that show the table show this one
        assert out.strip() in (docs / page).read_text(), (
            f"docs/{page}: paste the output of python -m lift_ds.memory --one_gpu"
        )


def test_streamed_arithmetic():
    """Streaming: everything but the decoder layers' linear weights, the active layer in 16-bit, and 3
    frozen layers' linear weights (NF4 or 16-bit) on the device, whatever the depth; AdamW8bit: 2 bytes
    of moments (plus scales) and a 16-bit gradient per trained parameter, no fp32 master."""
    s = memory.model_shape("llama-2-70b")
    per_layer = s.layer_linear / s.num_layers
    e = memory.estimate(s, "lift", 1, 0, frozen_weights="nf4", stream_frozen=True, optimizer="adamw8bit")
    t = max(s.candidate_sizes)
    assert e.params == (s.total - s.layer_linear) * 2 + per_layer * 2 + 3 * per_layer * 4.127 / 8
    assert e.grads == 2 * t and e.optimizer == t * (2 + 8 / 256)
    full = memory.estimate(s, "lift", 1, 0, stream_frozen=True)
    assert (
        full.params == (s.total - s.layer_linear) * 2 + per_layer * 2 + 3 * per_layer * 2 and full.optimizer == 12 * t
    )
    deeper = memory.model_shape("llama-2-13b")
    assert (
        memory.estimate(deeper, "lift", 1, 0, frozen_weights="nf4", stream_frozen=True).params
        < 0.2 * memory.estimate(deeper, "lift", 1, 0).params
    )
    with pytest.raises(ValueError, match="stream_frozen: LIFT below ZeRO-3 only"):
        memory.estimate(s, "lora", 1, 0, stream_frozen=True)


def test_logits_with_the_chunked_loss_and_the_models_own(capsys):
    """lift.loss: the model's loss holds 16-bit logits and their fp32 log-softmax for every position
    (6 s V bytes); lift_ds's chunked loss one chunk of them and the hidden-state gradient."""
    from lift_ds.loss import chunk_rows

    s = memory.model_shape("llama-3-8b")
    own = memory.logits_bytes(s, 2048, loss="model")
    chunked = memory.logits_bytes(s, 2048)
    assert own == 6 * 2048 * 128256
    assert chunked == chunk_rows(128256) * 128256 * 8 + 2048 * 4096 * 2 and chunked < 0.06 * own
    # full fine-tuning trains the head: its logits gradients in bf16 (2 s V < 4 V h here)
    assert memory.logits_bytes(s, 2048, head_trains=True) == chunked + 2 * 2048 * 128256
    a, b = (memory.estimate(s, "lift", 1, 0, loss=loss) for loss in ("model", "chunked"))
    assert a.activations - b.activations == own - chunked and a.model_states == b.model_states
    assert memory.main(["--model", "llama-3-8b", "--ranks", "1", "--zero", "0", "--seq_len", "2048"]) == 0
    assert (
        "0.08 GiB with lift.loss chunked, 1.47 GiB with the model's own loss (lift.loss model): 1.39 GiB less"
        in capsys.readouterr().out
    )
