"""Collapse diagnostics, generation metrics, the latent probe, reports and comparison."""

import json
import random

import matplotlib.image
import pytest
import torch

from tests.conftest import make_sentences
from textvae import cli
from textvae.data import TextDataset
from textvae.metrics import (
    GENERATION_KEYS,
    corpus_bleu,
    distinct_n,
    evaluate,
    generation_metrics,
    probe_accuracy,
    self_bleu,
    z_usage_gap,
)
from textvae.report import (
    compare_runs,
    evaluation_table,
    paired_differences,
    write_report,
)
from textvae.rundir import read_log
from textvae.train import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _ScalarCodeModel:
    """log p(x_b | z) = -(z_0 - target_b)^2: reconstruction is perfect only from x_b's own code."""

    def log_likelihood(self, batch, z):
        return -((z[..., 0] - batch["target"]) ** 2)


# --- z-usage gap -------------------------------------------------------------------------------


def test_z_gap_is_zero_when_the_decoder_ignores_z(tiny_model, tiny_batch):
    model = tiny_model("lstm_vae", z_init_state=False, z_every_step=False)  # z reaches nothing
    z = torch.randn(tiny_batch["input_ids"].size(0), 4) * 5
    gap = z_usage_gap(model, tiny_batch, z, torch.Generator().manual_seed(0))
    assert gap.shape == (tiny_batch["input_ids"].size(0),)
    assert torch.allclose(gap, torch.zeros_like(gap), atol=1e-5)


def test_z_gap_known_answer_for_two_sentences():
    """With B = 2 the only derangement swaps the codes: gap_b = (t_0 - t_1)^2 for both."""
    batch = {"target": torch.tensor([1.0, 4.0])}
    z = batch["target"].unsqueeze(1)  # (B, D=1): each sentence's own, perfect code
    gap = z_usage_gap(_ScalarCodeModel(), batch, z)
    assert gap.tolist() == [9.0, 9.0]


def test_z_gap_never_gives_a_sentence_its_own_code():
    targets = torch.arange(7, dtype=torch.float32)
    for seed in range(20):
        gap = z_usage_gap(
            _ScalarCodeModel(),
            {"target": targets},
            targets.unsqueeze(1),
            torch.Generator().manual_seed(seed),
        )
        assert bool((gap >= 1.0).all()), seed  # distinct integer codes: every swap costs >= 1


def test_z_gap_is_undefined_for_one_sentence():
    assert z_usage_gap(_ScalarCodeModel(), {"target": torch.ones(1)}, torch.ones(1, 1)) is None


def test_z_gap_is_large_for_a_model_trained_to_use_z(tiny_config, tmp_path):
    """Overfitting three sentences with free bits makes reconstructions depend on z."""
    run = train(
        tiny_config(
            **{
                "train.max_steps": 150,
                "train.lr": 0.02,
                "kl.free_bits": 1.0,
                "data.train_limit": 3,
                "train.batch_size": 3,
                "train.collapse_patience": 0,
            }
        ),
        tmp_path / "r",
    )
    import textvae

    model, tok = textvae.load(run, "last")
    sentences = open(model.config.data.train_path).read().splitlines()[:3]
    out = evaluate(model, TextDataset(sentences, tok), iw_samples=0, batch_size=3)
    assert out["z_gap"] > 1.0


# --- collapse warnings during training ---------------------------------------------------------


def _records(run, kind):
    return [r for r in map(json.loads, open(run / "log.jsonl")) if r["type"] == kind]


def test_validation_logs_the_diagnostics_and_warns_of_collapse(tiny_config, tmp_path):
    # any KL is below a threshold of 1e9: every validation counts as collapsed
    run = train(
        tiny_config(
            **{
                "train.max_steps": 12,
                "train.eval_every": 2,
                "train.collapse_kl": 1e9,
                "train.collapse_patience": 3,
            }
        ),
        tmp_path / "r",
    )
    valid = _records(run, "valid")
    assert len(valid) == 6
    for key in ("kl_per_dim", "au", "mi", "mi_batch", "z_gap", "beta"):
        assert valid[0][key] is not None, key
    warnings = _records(run, "warning")
    assert [w["step"] for w in warnings] == [6, 8, 10, 12]  # from the 3rd validation on
    assert warnings[0]["warning"] == "posterior collapse" and warnings[-1]["validations"] == 6
    assert "KL" in warnings[0]["message"]


def test_no_collapse_warning_when_switched_off_or_above_thresholds(tiny_config, tmp_path):
    off = train(
        tiny_config(
            **{
                "train.max_steps": 8,
                "train.eval_every": 2,
                "train.collapse_kl": 1e9,
                "train.collapse_patience": 0,
            }
        ),
        tmp_path / "off",
    )
    fine = train(
        tiny_config(
            **{
                "train.max_steps": 8,
                "train.eval_every": 2,
                "train.collapse_kl": -1,
                "train.collapse_z_gap": -1e9,
            }
        ),
        tmp_path / "fine",
    )
    assert _records(off, "warning") == [] and _records(fine, "warning") == []


# --- generation metrics -------------------------------------------------------------------------


def test_distinct_n_on_a_fixed_list():
    texts = ["a b a b", "a b c", ""]
    # unigrams: a b a b a b c -> 3 distinct of 7; bigrams: ab ba ab ab bc -> 3 distinct of 5
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    assert distinct_n(["a", "b"], 2) == 0.0


def test_bleu_and_self_bleu_extremes():
    same = ["the cat sat on the mat today"] * 4
    assert self_bleu(same)[0] == pytest.approx(100.0)
    assert corpus_bleu(same, same)[0] == pytest.approx(100.0)
    assert corpus_bleu(["a b c d e"], ["v w x y z"])[0] == pytest.approx(0.0)
    rng = random.Random(0)
    words = [f"w{i}" for i in range(200)]
    varied = [" ".join(rng.sample(words, 8)) for _ in range(20)]
    assert self_bleu(varied)[0] < 10.0
    with pytest.raises(ValueError):
        self_bleu(["only one"])
    with pytest.raises(ValueError):
        corpus_bleu(["a"], ["a", "b"])


def test_generation_metrics_on_a_tiny_model(tiny_model):
    model = tiny_model("lstm_vae")
    out = generation_metrics(model, make_sentences(12, seed=3), n_samples=10, max_length=8)
    assert set(out) == set(GENERATION_KEYS)
    assert 0.0 <= out["rec_bleu"] <= 100.0 and 0.0 <= out["self_bleu"] <= 100.0
    assert 0.0 <= out["distinct_1"] <= 1.0
    assert out["generation"]["rec_sentences"] == 12 and out["generation"]["strategy"] == "greedy"
    assert "tok:13a" in out["generation"]["bleu_signature"]
    lm = generation_metrics(tiny_model("lstm_lm"), [], n_samples=5, strategy="sample", max_length=8)
    assert lm["rec_bleu"] is None and lm["self_bleu"] is not None


# --- latent probe -------------------------------------------------------------------------------


def test_probe_reads_a_separable_label_and_reports_the_majority_baseline():
    torch.manual_seed(0)
    y_fit, y_score = torch.randint(0, 2, (400,)), torch.tensor([0] * 150 + [1] * 50)
    x_fit, x_score = torch.randn(400, 4), torch.randn(200, 4)
    x_fit[:, 2] += 4.0 * (2 * y_fit - 1)  # the label is written in dimension 2
    x_score[:, 2] += 4.0 * (2 * y_score - 1)
    results = probe_accuracy(x_fit, y_fit, x_score, y_score, [10, 100, None], repeats=3)
    assert [r["n"] for r in results] == [10, 100, 400]
    assert [r["repeats"] for r in results] == [3, 3, 1]
    assert results[0]["accuracy"] > 0.9 and results[1]["accuracy"] > 0.98
    assert results[2]["accuracy"] > 0.98
    # majority class of the fit subset, scored on a 75% / 25% set: 0.75 or 0.25 per subset
    assert all(0.25 <= r["majority"] <= 0.75 for r in results)
    assert results[-1]["majority"] == pytest.approx(0.75 if (y_fit == 0).sum() > 200 else 0.25)
    noise = probe_accuracy(torch.randn(400, 4), y_fit, x_score, y_score, [None])[0]
    assert noise["accuracy"] < 0.9  # features without the label cannot read it


def test_probe_rejects_impossible_sizes():
    x, y = torch.randn(10, 2), torch.tensor([0] * 9 + [1])
    with pytest.raises(ValueError, match="between 2"):
        probe_accuracy(x, y, x, y, [11])
    with pytest.raises(ValueError, match="one class"):
        probe_accuracy(x, torch.zeros(10, dtype=torch.long), x, y, [None])


def test_probe_cli_on_labelled_files(tiny_config, tmp_path, capsys):
    run = train(tiny_config(**{"train.max_steps": 4}), tmp_path / "r")
    rng = random.Random(0)
    for name, n in (("fit", 60), ("score", 30)):
        rows = ["text\tlabel"]
        for i in range(n):
            rows.append(
                f"{make_sentences(1, seed=i + 100 * n)[0]}\t{['neg', 'pos'][rng.randint(0, 1)]}"
            )
        (tmp_path / f"{name}.tsv").write_text("\n".join(rows) + "\n")
    args = [
        "probe",
        str(run),
        "--fit",
        str(tmp_path / "fit.tsv"),
        "--score",
        str(tmp_path / "score.tsv"),
        "--labels",
        "10,all",
        "--repeats",
        "2",
    ]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "majority class" in out and "| 60 |" in out
    record = json.loads((run / "probe-fit.json").read_text())
    assert [r["n"] for r in record["results"]] == [10, 60] and record["score_sentences"] == 30
    # a second probe never replaces the first: the default name gets a suffix, --output refuses
    first = (run / "probe-fit.json").read_bytes()
    assert cli.main([*args, "--labels", "all"]) == 0
    assert (run / "probe-fit.json").read_bytes() == first
    assert [r["n"] for r in json.loads((run / "probe-fit-2.json").read_text())["results"]] == [60]
    capsys.readouterr()
    assert cli.main([*args, "--output", str(run / "probe-fit.json")]) == 1
    assert "probe-fit.json exists" in capsys.readouterr().err
    assert (run / "probe-fit.json").read_bytes() == first
    # a corpus without labels is refused with a message naming the file
    assert cli.main(["probe", str(run)]) == 1
    assert "no labels" in capsys.readouterr().err


# --- reports and comparison ---------------------------------------------------------------------


def _assert_png(path):
    assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC, path
    assert matplotlib.image.imread(path).shape[0] > 100


def test_report_of_a_tiny_run(tiny_config, tmp_path):
    run = train(tiny_config(**{"train.max_steps": 10, "train.eval_every": 5}), tmp_path / "r")
    assert (
        cli.main(
            [
                "evaluate",
                str(run),
                "--iw-samples",
                "3",
                "--generation",
                "--gen-samples",
                "6",
                "--gen-sentences",
                "5",
            ]
        )
        == 0
    )
    folder = write_report(run, max_sentences=30, n_examples=3)
    for name in ("curves.png", "kl_per_dim.png", "latent_pca.png"):
        _assert_png(folder / name)
    md = (folder / "report.md").read_text()
    for text in (
        "# Run report",
        "**Latent status**",
        "## Evaluation",
        "`eval-test-full-K3-fp32-gen.json`",
        "## Examples",
        "Reconstructions",
        "Interpolation",
    ):
        assert text in md, text
    for image in ("curves.png", "kl_per_dim.png", "latent_pca.png"):
        assert f"]({image})" in md
    # a second report replaces the first, leaving no temporary folder behind
    write_report(run, max_sentences=30)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("report")) == ["report"]


def test_report_of_a_language_model_has_no_latent_plots(tiny_config, tmp_path):
    run = train(tiny_config(**{"train.max_steps": 4, "model.name": "lstm_lm"}), tmp_path / "lm")
    folder = write_report(run, max_sentences=20)
    _assert_png(folder / "curves.png")
    assert not (folder / "kl_per_dim.png").exists()
    assert "no latent variable" in (folder / "report.md").read_text()


def test_compare_two_tiny_runs(tiny_config, tmp_path, capsys):
    runs = [
        train(
            tiny_config(**{"train.max_steps": 6, "train.eval_every": 3, "model.pooling": p}),
            tmp_path / f"run-{p}",
        )
        for p in ("last", "mean")
    ]
    cli.main(["evaluate", str(runs[0]), "--iw-samples", "2"])
    capsys.readouterr()
    assert cli.main(["compare", *map(str, runs), "--output", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "| run-last |" in out and "| run-mean |" in out and "KL (nats/sent)" in out
    assert "No evaluation of `test` in: run-mean" in out
    _assert_png(tmp_path / "cmp" / "compare_curves.png")
    assert (tmp_path / "cmp" / "compare.md").read_text().startswith("# Run comparison")
    assert len(read_log(runs[0])["valid"]) == 2
    with pytest.raises(ValueError, match="share a folder name"):
        compare_runs([runs[0], runs[0]], tmp_path / "x")


def test_paired_differences_use_the_per_sentence_differences():
    ref = {
        "nll_per_sentence": [10.0, 20.0, 30.0, 40.0],
        "data": "d",
        "split": "test",
        "n_sentences": 4,
        "sentence_index": [0, 1, 2, 3],
        "n_words_per_sentence": [3, 4, 5, 6],
    }
    # the same offset on every sentence: mean difference 1.5, paired standard error 0
    # (the unpaired standard errors would be about 6.5 each)
    shifted = dict(ref, nll_per_sentence=[11.5, 21.5, 31.5, 41.5])
    mixed = dict(ref, nll_per_sentence=[9.0, 21.0, 29.0, 41.0])  # d = -1, 1, -1, 1
    other = dict(ref, data="elsewhere")
    same_file = dict(shifted, data="/abs/folder/d")  # the same file, written absolute
    lines = paired_differences(
        {
            "ref": ref,
            "shifted": shifted,
            "mixed": mixed,
            "other": other,
            "same_file": same_file,
            "old": {"nll": 3.0},
        }
    )
    assert "- same_file - ref: +1.50 ± 0.00 (0 of 4 sentences lower)" in lines
    assert "- shifted - ref: +1.50 ± 0.00 (0 of 4 sentences lower)" in lines
    # std of (-1, 1, -1, 1) with N - 1 = 3: sqrt(4 / 3); / sqrt(4) = 0.577
    assert "- mixed - ref: +0.00 ± 0.58 (2 of 4 sentences lower)" in lines
    assert any(line.startswith("- other: not paired") for line in lines)
    assert not any("old" in line for line in lines)
    assert paired_differences({"ref": ref, "old": {"nll": 3.0}}) == []


def test_compare_pairs_two_evaluations_of_the_same_sentences(tiny_config, tmp_path, capsys):
    runs = [
        train(tiny_config(**{"train.max_steps": 4, "model.pooling": p}), tmp_path / f"r-{p}")
        for p in ("last", "mean")
    ]
    for run in runs:
        assert cli.main(["evaluate", str(run), "--iw-samples", "3", "--max-sentences", "12"]) == 0
    capsys.readouterr()
    r = [json.loads((run / "eval-test-12-K3-fp32.json").read_text()) for run in runs]
    for result in r:  # the per-sentence values are the ones behind nll
        assert len(result["nll_per_sentence"]) == 12
        assert sum(result["nll_per_sentence"]) / 12 == pytest.approx(result["nll"], rel=1e-9)
    assert cli.main(["compare", *map(str, runs), "--output", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    d = [a - b for a, b in zip(r[1]["nll_per_sentence"], r[0]["nll_per_sentence"], strict=True)]
    assert f"- r-mean - r-last: {sum(d) / 12:+.2f} ±" in out
    assert "nll_per_sentence" not in out  # the table shows the summary fields only


def test_evaluation_table_formats_units_and_missing_values():
    table = evaluation_table(
        {
            "a": {"nll": 100.0, "nll_stderr": 0.5, "au": 3, "au_delta": 0.01, "kl": 1.23456},
            "b": {"kl": None},
        },
        {"a": 32, "b": 32},
    )
    lines = table.splitlines()
    assert lines[0] == "| run | KL (nats/sent) | IW-NLL (nats/sent) | AU |"
    assert lines[2] == "| a | 1.235 | 100.00 ± 0.50 | 3/32 (δ=0.01) |"
    assert lines[3] == "| b | – | – | – |"


def test_collapse_reason_names_the_criterion_that_holds():
    from textvae.report import latent_status
    from textvae.rundir import collapse_reason

    assert collapse_reason(0.1, 2.0, 0.5, 0.5) == "z carries little information"
    assert collapse_reason(3.0, 0.1, 0.5, 0.5) == "the decoder barely uses z"
    assert "and the decoder barely uses it" in collapse_reason(0.1, 0.1, 0.5, 0.5)
    assert collapse_reason(0.1, None, 0.5, 0.5) == "z carries little information"
    assert latent_status(3.0, 2.0, 32, 32, 0.5, 0.5).startswith("**in use**")
    assert latent_status(0.1, 2.0, 1, 32, 0.5, 0.5).startswith("**collapsed**: z carries")
    assert latent_status(None, None, None, 0, 0.5, 0.5).startswith("no latent")
