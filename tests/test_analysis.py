"""lift_ds.analysis on a tiny random-init model: table shapes, valid PNGs, clear errors."""

import csv
import json

import pytest

from lift_ds.analysis import main, named_range, recommend_range, settings

from helpers import make_model_dir, write_sentiment

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    d = tmp_path_factory.mktemp("analysis")
    make_model_dir(d / "model", layers=3)
    write_sentiment(d / "train.jsonl", 32)
    write_sentiment(d / "eval.jsonl", 12, seed=1)
    (d / "mc.jsonl").write_text(
        "".join(
            json.dumps({"input": f"Is {w} good?", "target_scores": {"Yes": int(i % 2 == 0), "No": int(i % 2)}}) + "\n"
            for i, w in enumerate(["this", "that", "it", "the plot", "the film", "acting"] * 3)
        )
    )
    return d


def tasks(d):
    return [
        "--task",
        f"reviews=classification:{d}/train.jsonl:{d}/eval.jsonl",
        "--task",
        f"mc=multiple_choice:{d}/mc.jsonl",
    ]


def test_contribution_table_heatmap_and_recommendation(d, capsys):
    out = d / "contribution"
    code = main(
        [
            "contribution",
            "--model",
            str(d / "model"),
            *tasks(d),
            "--steps",
            "3",
            "--micro_batch",
            "4",
            "--out",
            str(out),
            "--window",
            "2",
        ]
    )
    assert code == 0
    rows = list(csv.DictReader(open(out / "contribution.csv")))
    assert [r["block"] for r in rows] == ["embedding", "model.layers.0", "model.layers.1", "model.layers.2"]
    for t in ("reviews", "mc"):
        rel = [float(r[f"rel_{t}"]) for r in rows]
        assert abs(sum(rel) / len(rel) - 1.0) < 1e-9  # relative to the average over blocks
    assert (out / "contribution.png").read_bytes()[:8] == PNG
    res = json.loads((out / "contribution.json").read_text())
    first, last = res["recommended_layer_range"]
    assert last - first == 1 and 1 <= first <= 2
    assert "recommended layer_range: [" in capsys.readouterr().out


def test_contribution_sublayers_with_classifier_head(d):
    out = d / "sub"
    code = main(
        [
            "contribution",
            "--model",
            str(d / "model"),
            "--task",
            f"reviews=classification:{d}/train.jsonl:{d}/eval.jsonl",
            "--classifier_head",
            "--sublayers",
            "--only",
            "model.layers.1",
            "--steps",
            "2",
            "--micro_batch",
            "4",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    blocks = [r["block"] for r in csv.DictReader(open(out / "contribution.csv"))]
    # every linear and norm of the layer, each alone (with the head)
    assert blocks == [
        f"model.layers.1.{m}"
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
            "input_layernorm",
            "post_attention_layernorm",
        )
    ]


def test_ablation_table_in_the_papers_layout(d, capsys):
    out = d / "ablation"
    code = main(
        [
            "ablation",
            "--model",
            str(d / "model"),
            *tasks(d),
            "--steps",
            "6",
            "--micro_batch",
            "4",
            "--ranges",
            "all,first,2-3",
            "--schedules",
            "front2end,random",
            "--policies",
            "grouped,cyclic",
            "--seeds",
            "0,1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    header = table.splitlines()[0]
    assert header == "| setting | reviews | mc | average |"
    labels = [r["setting"] for r in json.loads((out / "ablation.json").read_text())["rows"]]
    assert labels == [
        "FT-Full",
        "LIFT all front2end grouped",
        "LIFT first [1, 1] front2end grouped",
        "LIFT [2, 3] front2end grouped",
        "LIFT all random grouped",
        "LIFT all front2end cyclic",
    ]
    assert (out / "ablation.md").read_text().startswith(header)


def test_full_grid_and_named_ranges():
    assert named_range("middle", 12) == ("middle [5, 8]", [5, 8])
    assert named_range("last", 30) == ("last [21, 30]", [21, 30])
    rows = settings(12, ["all", "middle"], ["front2end", "random"], ["grouped", "cyclic"], "full")
    assert len(rows) == 8


def test_recommend_range_picks_the_best_window():
    rows = [{"layer": k, "rel_a": v} for k, v in zip(range(1, 7), [0.8, 0.9, 1.3, 1.2, 0.9, 0.9])]
    assert recommend_range(rows, ["a"], 2)[0] == [3, 4]


def test_curves_png(d, tmp_path):
    runs = []
    for name, losses in (("LIFT", [2.0, 1.5, 1.2]), ("FT-Full", [2.0, 1.4, 1.1])):
        f = tmp_path / f"{name}.jsonl"
        f.write_text(
            "".join(json.dumps({"step": 10 * i, "eval_loss": v}) + "\n" for i, v in enumerate(losses))
            + json.dumps({"step": 5, "loss": 3.0, "step_s": 0.5})
            + "\n"
        )
        runs += ["--run", f"{name}={f}"]
    assert main(["curves", *runs, "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG
    # the data behind the plot, with where and when it was made (docs' tables are read from it)
    data = json.loads((tmp_path / "c.json").read_text())
    assert [e["eval_loss"] for e in data["runs"]["LIFT"]["evaluations"]] == [2.0, 1.5, 1.2]
    assert data["runs"]["FT-Full"]["median_step_s"] == 0.5
    assert (
        data["provenance"]["date"] and data["provenance"]["machine"]["cpu"]["model"] and "commit" in data["provenance"]
    )


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["contribution", "--task", "nonsense", "--out", "x"], "--task: 'nonsense' is not a task"),
        (["contribution", "--task", "t=csv:a.jsonl", "--out", "x"], "FORMAT one of"),
        (
            ["contribution", "--task", "t=text:/nonexistent.jsonl", "--out", "x"],
            "file '/nonexistent.jsonl' does not exist",
        ),
        (
            ["ablation", "--task", "REVIEWS", "--ranges", "5-2", "--out", "x"],
            "--ranges: '5-2' must satisfy 1 <= A <= B <= 3",
        ),
        (["ablation", "--task", "REVIEWS", "--schedules", "sideways", "--out", "x"], "--schedules: 'sideways' unknown"),
        (["ablation", "--task", "REVIEWS", "--steps", "0", "--out", "x"], "--steps: must be >= 1"),
        (
            ["contribution", "--task", "REVIEWS", "--seeds", "a,b", "--out", "x"],
            "--seeds: expected comma-separated integers",
        ),
        (["curves", "--run", "nolabel", "--out", "x.png"], "--run: 'nolabel' must be LABEL=path/to/metrics.jsonl"),
        (["curves", "--run", "A=/nonexistent/metrics.jsonl", "--out", "x.png"], "does not exist"),
    ],
)
def test_bad_arguments_exit_2(d, capsys, argv, needle):
    argv = [a.replace("REVIEWS", f"r=classification:{d}/train.jsonl:{d}/eval.jsonl") for a in argv]
    if argv[0] != "curves":
        argv += ["--model", str(d / "model")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_metrics_without_eval_loss_is_a_clear_error(tmp_path, capsys):
    f = tmp_path / "m.jsonl"
    f.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    assert main(["curves", "--run", f"A={f}", "--out", str(tmp_path / "c.png")]) == 2
    assert "no records with 'eval_loss' (train with --eval_every N" in capsys.readouterr().err


def test_zeroshot_scores_the_untrained_model(d, capsys):
    out = d / "zeroshot"
    assert main(["zeroshot", "--model", str(d / "model"), *tasks(d), "--out", str(out)]) == 0
    res = json.loads((out / "zeroshot.json").read_text())
    assert set(res["tasks"]) == {"reviews", "mc"}
    for r in res["tasks"].values():
        assert 0.0 <= r["score"] <= 1.0 and r["score"] == r["eval_accuracy"]
    assert "reviews: zero-shot score" in capsys.readouterr().out


@pytest.mark.slow
def test_compare_picks_best_lr_on_validation_and_reports_test_over_seeds(d, capsys):
    """Runs through launch/train.py, best learning rate by the first seed's validation score, the other
    seeds at that rate, test mean/std over seeds; a second invocation reads finished runs back."""
    from types import SimpleNamespace

    from lift_ds.analysis.common import Task
    from lift_ds.analysis.compare import test_score

    out = d / "compare"
    argv = [
        "compare",
        "--model",
        str(d / "model"),
        "--task",
        f"reviews=classification:{d}/train.jsonl:{d}/eval.jsonl",
        "--methods",
        "lift,lisa",
        "--lrs",
        "lift=1e-3,3e-2",
        "--lrs",
        "lisa=1e-2",
        "--seeds",
        "0,1",
        "--steps",
        "4",
        "--micro_batch",
        "4",
        "--val_items",
        "8",
        "--switch_every",
        "2",
        "--keep_models",
        "--out",
        str(out),
    ]
    stale = out / "runs" / "reviews" / "lift" / "lr0.001" / "seed0" / "out"  # a run cut short by an earlier invocation
    stale.mkdir(parents=True)
    (stale / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval_loss": 9.0, "eval_accuracy": 0.0}) + "\n")
    assert main(argv) == 0
    res = json.loads((out / "compare.json").read_text())
    # every rate with seed 0, then seed 1 at each method's best rate only: 3 + 2 runs
    assert len(res["runs"]) == 5 and len((out / "data" / "reviews" / "val.jsonl").read_text().splitlines()) == 8
    lift = res["table"]["reviews"]["lift"]
    seed0 = {r["lr"]: r["val"] for r in res["runs"] if r["method"] == "lift" and r["seed"] == 0}
    assert {float(k): v for k, v in lift["val_by_lr"].items()} == seed0
    assert lift["best_lr"] == max(seed0, key=lambda k: (seed0[k], -k))
    assert [r["lr"] for r in res["runs"] if r["method"] == "lift" and r["seed"] == 1] == [lift["best_lr"]]
    at_best = [r["test"]["score"] for r in res["runs"] if r["method"] == "lift" and r["lr"] == lift["best_lr"]]
    assert lift["seeds"] == 2 and abs(lift["test_mean"] - sum(at_best) / 2) < 1e-12
    # the first seed's runs validate every step (the curves), the others before and after only; no run checkpoints
    assert all(
        [p["step"] for p in r["val_curve"]] == ([0, 1, 2, 3, 4] if r["seed"] == 0 else [0, 4]) for r in res["runs"]
    )
    assert not list((out / "runs").rglob("checkpoints"))
    assert (out / "curves_reviews.png").read_bytes()[:8] == PNG
    assert "| lift |" in (out / "compare.md").read_text()
    # the test scorer (exported model, reloaded) gives the launcher's own validation score on the validation file
    run = res["runs"][0]
    run_dir = out / "runs" / "reviews" / "lift" / f"lr{run['lr']:g}" / "seed0"
    args = SimpleNamespace(seq_len=64, test_limit=0)
    task = Task(
        "reviews",
        "classification",
        str(out / "data" / "reviews" / "train.jsonl"),
        str(out / "data" / "reviews" / "val.jsonl"),
    )
    assert test_score(run_dir / "out" / "final", task, args)["score"] == run["val"]
    stamp = (run_dir / "result.json").stat().st_mtime_ns
    assert main(argv) == 0 and (run_dir / "result.json").stat().st_mtime_ns == stamp
    # --report_only launches nothing: asked for a third seed and a rate never run, it reports what exists
    capsys.readouterr()
    more = [a if a != "0,1" else "0,1,2" for a in argv]
    more[more.index("lisa=1e-2")] = "lisa=1e-2,5e-2"
    assert main(more + ["--report_only"]) == 0
    res = json.loads((out / "compare.json").read_text())
    assert len(res["runs"]) == 5 and (run_dir / "result.json").stat().st_mtime_ns == stamp
    assert not res["table"]["reviews"]["lift"]["complete"] and res["table"]["reviews"]["lift"]["seeds"] == 2
    assert "(n=2, 1/2 rates)" in capsys.readouterr().out  # lisa: one of its two rates finished


@pytest.mark.parametrize("fmt", ["classification", "multiple_choice"])
def test_lm_eval_agrees_with_lift_ds_item_by_item(d, tmp_path, fmt, capsys):
    """EleutherAI's lm-eval, reading a YAML task over our local file, gives lift_ds's accuracy and the
    same per-choice log-likelihoods (a changed prompt or continuation in the YAML shows as a gap)."""
    pytest.importorskip("lm_eval")
    from lift_ds.analysis.common import Task
    from lift_ds.analysis.lmeval import agreement

    task = (
        Task("reviews", "classification", f"{d}/train.jsonl", f"{d}/eval.jsonl")
        if fmt == "classification"
        else Task("mc", "multiple_choice", f"{d}/mc.jsonl", f"{d}/mc.jsonl")
    )
    r = agreement(str(d / "model"), task, 64, 0, tmp_path / "tasks")
    assert r["items"] == r["lm_eval_items"] > 0
    assert r["lm_eval_accuracy"] == r["lift_ds_accuracy"] and r["items_choosing_differently"] == 0
    assert r["max_loglikelihood_gap"] < 1e-4, r
    if fmt == "classification":
        assert (
            main(
                [
                    "lmeval",
                    "--model",
                    str(d / "model"),
                    "--task",
                    f"reviews=classification:{d}/train.jsonl:{d}/eval.jsonl",
                    "--limit",
                    "5",
                    "--out",
                    str(tmp_path / "cli"),
                ]
            )
            == 0
        )
        assert "5 items, lift_ds accuracy" in capsys.readouterr().out
        assert json.loads((tmp_path / "cli" / "lmeval.json").read_text())["rows"][0]["items"] == 5
