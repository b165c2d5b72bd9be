import pytest
from torch import nn

from lift_ds.blocks import find_blocks, match_modules, select_candidates, set_trainable
from lift_ds.config import parse_lift_section
from lift_ds.errors import BlockFindingError, ConfigError

from helpers import tiny_llama


def _build(arch: str, tie: bool | None = None):
    import transformers as T

    small = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
    if arch == "llama":
        cfg, cls = T.LlamaConfig(num_key_value_heads=2, **small), T.LlamaForCausalLM
    elif arch == "mistral":
        cfg, cls = T.MistralConfig(num_key_value_heads=2, **small), T.MistralForCausalLM
    elif arch == "qwen2":
        cfg, cls = T.Qwen2Config(num_key_value_heads=2, **small), T.Qwen2ForCausalLM
    elif arch == "gpt2":
        cfg, cls = (
            T.GPT2Config(
                vocab_size=128, n_embd=32, n_layer=3, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0
            ),
            T.GPT2LMHeadModel,
        )
    elif arch == "neox":
        cfg, cls = T.GPTNeoXConfig(**small), T.GPTNeoXForCausalLM
    elif arch == "bert":
        cfg, cls = T.BertConfig(num_labels=2, **small), T.BertForSequenceClassification
    else:
        raise ValueError(arch)
    if tie is not None:
        cfg.tie_word_embeddings = tie
    return cls(cfg)


@pytest.mark.parametrize(
    "arch,layer_prefix,emb,head",
    [
        ("llama", "model.layers", {"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
        ("mistral", "model.layers", {"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
        ("qwen2", "model.layers", {"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}),
        (
            "gpt2",
            "transformer.h",
            {"transformer.wte.weight", "transformer.wpe.weight"},
            {"transformer.ln_f.weight", "transformer.ln_f.bias"},
        ),
        (
            "neox",
            "gpt_neox.layers",
            {"gpt_neox.embed_in.weight"},
            {"gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias", "lm_head.weight"},
        ),
        ("bert", "bert.encoder.layer", None, None),
    ],
)
def test_blocks_per_architecture(arch, layer_prefix, emb, head):
    model = _build(arch)
    blocks = find_blocks(model)
    assert [b.kind for b in blocks] == ["embedding", "layer", "layer", "layer", "head"]
    assert [b.name for b in blocks[1:4]] == [f"{layer_prefix}.{i}" for i in range(3)]
    assert [b.layer_number for b in blocks[1:4]] == [1, 2, 3]
    # every parameter is in exactly one block
    all_names = [n for n, _ in model.named_parameters()]
    in_blocks = [n for b in blocks for n in b.param_names]
    assert sorted(in_blocks) == sorted(all_names)
    for b in blocks[1:4]:
        assert all(n.startswith(b.name + ".") for n in b.param_names)
    if emb is not None:
        assert set(blocks[0].param_names) == emb
        assert set(blocks[-1].param_names) == head
    if arch == "bert":
        assert all(n.startswith("bert.embeddings.") for n in blocks[0].param_names)
        assert {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight"} <= set(blocks[-1].param_names)


def test_tied_embeddings_are_one_block():
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    blocks = find_blocks(model)
    assert blocks[0].param_names == ("model.embed_tokens.weight",)
    assert blocks[-1].param_names == ("model.norm.weight",)  # lm_head is the embedding


def test_no_layer_stack_error_lists_what_was_looked_for():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(BlockFindingError) as e:
        find_blocks(model)
    msg = str(e.value)
    assert "Sequential" in msg and "_no_split_modules" in msg and "ModuleList" in msg


def test_plain_module_with_uniform_modulelist():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 8)
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
            self.out = nn.Linear(8, 2)

    blocks = find_blocks(Net())
    assert [b.name for b in blocks] == ["embedding", "layers.0", "layers.1", "layers.2", "head"]


def test_select_candidates_ranges():
    model = _build("bert")
    blocks = find_blocks(model)
    c = select_candidates(blocks, parse_lift_section({}))
    assert [b.layer_number for b in c] == [1, 2, 3]
    c = select_candidates(
        blocks, parse_lift_section({"layer_range": [2, 3], "include_embedding": True, "include_head": True})
    )
    assert [b.name for b in c] == ["embedding", "bert.encoder.layer.1", "bert.encoder.layer.2", "head"]
    with pytest.raises(ConfigError, match=r"lift.layer_range: \[2, 9\] reaches past the model's 3 layers"):
        select_candidates(blocks, parse_lift_section({"layer_range": [2, 9]}))


def test_always_trainable_patterns():
    model = _build("bert")
    assert match_modules(model, ["classifier"]) == ["classifier.weight", "classifier.bias"]
    assert len(match_modules(model, ["bert.encoder.layer.*.attention.self.query"])) == 6
    with pytest.raises(ConfigError, match="'clasifier' matches no module"):
        match_modules(model, ["clasifier"])


def test_set_trainable():
    model = tiny_llama()
    ps = set_trainable(model, ["model.norm.weight", "lm_head.weight"])
    assert len(ps) == 2
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["model.norm.weight", "lm_head.weight"]
