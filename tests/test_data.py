import json

import pytest

from lift_ds.data import IGNORE_INDEX, RankBatches, load_examples, read_jsonl, tokenize
from lift_ds.errors import DataError

from helpers import make_model_dir, write_sentiment


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    d = make_model_dir(tmp_path_factory.mktemp("m"))
    return AutoTokenizer.from_pretrained(d)


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize(
    "content,needle",
    [
        (['{"text": "a", "label": "positive"}', '{"text": "b", "label": "positive"'], ":2: invalid JSON"),
        (['{"text": "a", "label": "positive"}', "", '["not", "an object"]'], ":3: expected a JSON object"),
        (['{"txt": "a", "label": "positive"}'], ":1: missing field 'text' or 'sentence'"),
        (['{"text": 5, "label": "positive"}'], ":1: field 'text' must be str"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, content, needle):
    p = write(tmp_path / "d.jsonl", content)
    with pytest.raises(DataError) as e:
        load_examples(p, "classification")
    assert str(p) in str(e.value) and needle in str(e.value)


def test_empty_missing_and_non_utf8(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        read_jsonl(tmp_path / "e.jsonl")
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "ok", "label": "x"}\n{"text": "caf\xe9", "label": "x"}\n')
    with pytest.raises(DataError, match=r"b.jsonl:2: not UTF-8"):
        read_jsonl(tmp_path / "b.jsonl")
    (tmp_path / "t.txt").write_bytes(b"line one\nline \xff two\n")
    with pytest.raises(DataError, match=r"t.txt:2: not UTF-8"):
        load_examples(tmp_path / "t.txt", "text")


def test_label_not_in_label_set(tmp_path):
    p = write(tmp_path / "d.jsonl", ['{"text": "a", "label": "positive"}', '{"text": "b", "label": "neutral"}'])
    with pytest.raises(
        DataError, match=r"d.jsonl:2: label 'neutral' is not in the label set \['negative', 'positive'\]"
    ):
        load_examples(p, "classification", ["negative", "positive"])


def test_unknown_format(tmp_path):
    with pytest.raises(DataError, match="--format: 'csv' unknown"):
        load_examples(tmp_path / "x", "csv")


def test_classification_masks_prompt(tmp_path, tok):
    p = tmp_path / "s.jsonl"
    write_sentiment(p, 6)
    exs, labels = load_examples(p, "classification")
    assert labels == ["negative", "positive"] and exs[0].choices == [" negative", " positive"] and exs[0].answer == 1
    data = tokenize(exs, tok, "classification", 64)
    for ex, ids, lab in zip(exs, data.input_ids, data.labels):
        n_prompt = len(tok(ex.prompt, add_special_tokens=False)["input_ids"])
        assert len(ids) == len(lab) and n_prompt > 0
        assert lab[:n_prompt] == [IGNORE_INDEX] * n_prompt  # no loss on the prompt
        trained = lab[n_prompt:]
        assert trained == ids[n_prompt:] and trained[-1] == tok.eos_token_id
        assert tok.decode(trained[:-1]) == ex.response


def test_truncation_counted_or_refused(tmp_path, tok):
    p = write(
        tmp_path / "pr.jsonl",
        [
            json.dumps({"prompt": "great acting " * 30, "response": "yes"}),
            json.dumps({"prompt": "hi", "response": "ok"}),
        ],
    )
    exs, _ = load_examples(p, "prompt_response")
    data = tokenize(exs, tok, "prompt_response", 16)
    assert data.truncated == 1 and max(len(x) for x in data.input_ids) <= 16
    assert tok.decode([t for t in data.labels[0] if t != IGNORE_INDEX]).startswith("yes")
    with pytest.raises(
        DataError, match=r"pr.jsonl:1: \d+ tokens > --seq_len 16; raise --seq_len, or drop --no_truncate"
    ):
        tokenize(exs, tok, "prompt_response", 16, truncate=False)


def test_text_packing(tmp_path, tok):
    p = tmp_path / "c.txt"
    p.write_text("a wonderful and moving film. " * 40)
    exs, _ = load_examples(p, "text")
    data = tokenize(exs, tok, "text", 8)
    assert all(len(x) == 8 for x in data.input_ids) and data.labels == data.input_ids
    with pytest.raises(DataError, match="fewer than --seq_len"):
        tokenize(exs, tok, "text", 100000)


def test_multiple_choice_both_styles(tmp_path):
    p = write(
        tmp_path / "mc.jsonl",
        [
            json.dumps({"question": "2+2?", "choices": ["3", "4"], "answer": 1}),
            json.dumps({"input": "sky?", "target_scores": {"green": 0, "blue": 1}}),
        ],
    )
    exs, _ = load_examples(p, "multiple_choice")
    assert [e.answer for e in exs] == [1, 1] and exs[1].choices == [" green", " blue"]
    bad = write(tmp_path / "bad.jsonl", [json.dumps({"question": "q", "choices": ["a"], "answer": 3})])
    with pytest.raises(DataError, match="bad.jsonl:1: answer 3 is not an index"):
        load_examples(bad, "multiple_choice")


def test_rank_batches_disjoint_and_reproducible(tmp_path, tok):
    p = tmp_path / "s.jsonl"
    write_sentiment(p, 40)
    data = tokenize(load_examples(p, "classification")[0], tok, "classification", 32)
    r0 = RankBatches(data, 4, 0, 2, seed=3, pad_id=0)
    r1 = RankBatches(data, 4, 1, 2, seed=3, pad_id=0)
    assert r0.steps_per_epoch == 5
    seen = []
    for k in range(5):
        for r in (r0, r1):
            seen += [tuple(row.tolist()) for row in r.batch(k)["input_ids"]]
    assert len(seen) == 40
    again = RankBatches(data, 4, 0, 2, seed=3, pad_id=0)
    assert again.batch(7)["input_ids"].tolist() == r0.batch(7)["input_ids"].tolist()
    with pytest.raises(DataError, match="fewer than one global batch"):
        RankBatches(data, 32, 0, 2, seed=0, pad_id=0)


def test_rank_batches_are_keyed_by_global_sample_index(tmp_path, tok):
    """2 ranks x 1 accumulation step and 1 rank x 2 read the same micro-batches at every optimizer
    step (epochs included), so a run can resume on another number of ranks with the same data."""
    p = tmp_path / "s.jsonl"
    write_sentiment(p, 44)
    data = tokenize(load_examples(p, "classification")[0], tok, "classification", 32)
    two = [RankBatches(data, 4, r, 2, seed=3, pad_id=0) for r in (0, 1)]
    one = RankBatches(data, 4, 0, 1, seed=3, pad_id=0, accumulation=2)
    assert two[0].steps_per_epoch == one.steps_per_epoch == 5  # 44 samples: 5 global batches of 8 per epoch
    for step in range(12):  # past two epoch boundaries
        for r in (0, 1):
            assert two[r].batch(step)["input_ids"].tolist() == one.batch(2 * step + r)["input_ids"].tolist(), (step, r)


def test_sentencepiece_tokenizer_model_directory(tmp_path):
    """A directory holding only a SentencePiece tokenizer.model (LLaMA style) loads through the launcher's path."""
    import sentencepiece as spm

    from lift_ds.recipe import load_tokenizer as _load_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(
            ["a wonderful and moving film", "a dull and tedious mess", "great acting", "the plot makes no sense"] * 50
        )
    )
    d = tmp_path / "sp"
    d.mkdir()
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(d / "tokenizer"),
        vocab_size=30,
        model_type="unigram",
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
    )
    tok = _load_tokenizer(str(d))
    ids = tok("a wonderful film", add_special_tokens=False)["input_ids"]
    assert ids and tok.decode(ids).strip() == "a wonderful film"
    assert tok.pad_token_id is not None and tok.eos_token_id == 2
