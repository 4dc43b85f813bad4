"""The run report and `textvae compare` draw and name each run with the quantities it has: a
language model (no latent) has an exact -log p(x), no reconstruction term, KL or beta."""

from __future__ import annotations

from textvae import cli, report
from textvae.report import evaluation_table
from textvae.train import train


def test_report_of_a_language_model_names_its_sampling_and_its_exact_nll(tiny_config, tmp_path):
    run = train(tiny_config(**{"train.max_steps": 2, "model.name": "lstm_lm"}), tmp_path / "lm")
    assert cli.main(["evaluate", str(run)]) == 0
    md = (report.write_report(run, max_sentences=8, n_examples=2) / "report.md").read_text()
    assert "z ~ p(z)" not in md and "greedy" not in md
    assert "Samples (no latent: ancestral sampling from p(x)):" in md
    assert "IW" not in md  # neither the column nor the report's own row
    assert "| NLL (nats/sent, exact) |" in md
    assert "exact -log p(x) on the validation split" in md  # the curves' caption


def test_evaluation_table_names_an_exact_nll_exact():
    vae = {"rec": 10.0, "kl": 1.0, "elbo": -11.0, "nll": 10.5, "nll_stderr": 0.1, "iw_samples": 5}
    lm = {"rec": 10.2, "elbo": -10.2, "nll": 10.2, "nll_stderr": 0.1, "iw_samples": None}
    assert "| IW-NLL (nats/sent) |" in evaluation_table({"vae": vae})
    assert "| NLL (nats/sent, exact) |" in evaluation_table({"lm": lm})
    mixed = evaluation_table({"vae": vae, "lm": lm}).splitlines()
    assert "| NLL (nats/sent; IW bound, exact for an LM) |" in mixed[0]
    # an LM has no reconstruction term: its -log p(x) is not put beside the VAE's rec
    assert mixed[3].startswith("| lm | – | – | -10.20 | 10.20 ± 0.10 |")
