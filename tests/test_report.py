"""The run report and `textvae compare` draw and name each run with the quantities it has: a
language model (no latent) has an exact -log p(x), no reconstruction term, KL or beta."""

from __future__ import annotations

import pytest

from textvae import cli, report
from textvae.report import compare_runs, evaluation_table, plot_curves, plot_kl_per_dim
from textvae.rundir import read_log
from textvae.train import train


def _panels(fig) -> dict[str, list[str]]:
    """Panel title -> labels of the lines that hold data (legend entries without data left out)."""
    return {
        ax.get_title(): [line.get_label() for line in ax.get_lines() if len(line.get_xdata())]
        for ax in fig.axes
    }


def _panel(fig, word: str):
    """The one axes whose title starts with ``word``."""
    (ax,) = [ax for ax in fig.axes if ax.get_title().startswith(word)]
    return ax


def _logs() -> dict[str, dict[str, list[dict]]]:
    """A VAE and a language model as ``read_log`` gives them: the LM's training windows as logs
    written before 2026-12-07 carry them (kl 0.0 and a beta; train.py now leaves both out), its
    validations rec = -elbo = its NLL."""
    vae_train = [{"step": s, "rec": 60.0, "kl": 4.0, "beta": 1.0} for s in (5, 10)]
    vae_valid = [
        {"step": s, "elbo": -e, "rec": e - 4.0, "kl": 4.0, "mi": 2.0, "au": 5, "z_gap": 1.0}
        for s, e in ((5, 66.0), (10, 65.0))
    ]
    lm_train = [{"step": s, "rec": 61.0, "kl": 0.0, "beta": 1.0} for s in (5, 10)]
    lm_valid = [{"step": s, "elbo": -e, "rec": e, "kl": None} for s, e in ((5, 63.0), (10, 62.0))]
    return {
        "vae": {"train": vae_train, "valid": vae_valid},
        "lm": {"train": lm_train, "valid": lm_valid},
    }


def test_curves_draw_a_language_model_only_where_it_has_the_quantity(tmp_path):
    fig = plot_curves(_logs(), tmp_path / "c.png", "curves", {"vae": True, "lm": False})
    assert (tmp_path / "c.png").is_file()
    panels = _panels(fig)
    # the likelihood panel: the VAE's -ELBO beside the LM's exact NLL, both from validations
    like = _panel(fig, "likelihood")
    lines = {line.get_label(): list(line.get_ydata()) for line in like.get_lines()}
    assert lines["vae -ELBO valid"] == [66.0, 65.0]
    assert lines["lm NLL valid (exact)"] == [63.0, 62.0]
    assert lines["vae -ELBO train"] == [64.0, 64.0]  # training windows: rec + kl
    # no LM in any latent panel: not at KL = 0, not in beta, not as a reconstruction
    for title, labels in panels.items():
        if not title.startswith("likelihood"):
            assert not [x for x in labels if x.startswith("lm")], title
    for word in ("reconstruction", "KL(", "KL weight"):
        assert [x for x in panels[_panel(fig, word).get_title()] if x.startswith("vae")]
    # and the figure says why it is missing there
    caption = fig.get_suptitle()
    assert "lm" in caption and "no latent" in caption and "likelihood panel" in caption


def test_likelihood_panel_leaves_out_the_autoencoder_phase(tmp_path):
    """An autoencoder phase's -ELBO (KL unpaid, hundreds of nats) is not drawn in the likelihood
    panel, so it does not set its scale; its KL still is, in the KL panel."""
    logs = _logs()
    ae = {"phase": "ae", "rec": 50.0, "kl": 900.0}
    logs["vae"]["valid"].insert(0, {"step": 1, "elbo": -950.0, **ae, "mi": 2.0, "au": 5})
    logs["vae"]["train"].insert(0, {"step": 1, "beta": 0.0, **ae})
    fig = plot_curves(logs, tmp_path / "c.png", "curves", {"vae": True, "lm": False})
    lines = {line.get_label(): list(line.get_ydata()) for line in _panel(fig, "likelihood").lines}
    assert lines["vae -ELBO valid"] == [66.0, 65.0] and lines["vae -ELBO train"] == [64.0, 64.0]
    assert max(_panel(fig, "likelihood").get_ylim()) < 100
    kl = {line.get_label(): list(line.get_ydata()) for line in _panel(fig, "KL(").lines}
    assert 900.0 in kl["vae valid"]


def test_likelihood_panel_clips_the_hand_off_spike_and_says_so(tmp_path):
    """Training windows right after an autoencoder hand-off (KL of hundreds of nats at beta ~ 0)
    would set the likelihood panel's scale; the panel is scaled to its validations instead, the
    spike stays in the data, and the x label says how many windows it clipped."""
    logs = _logs()
    calm = [{"step": s, "rec": 60.0, "kl": 4.0, "beta": 1.0} for s in range(11, 111)]
    logs["vae"]["train"] += [{"step": 6, "rec": 60.0, "kl": 300.0, "beta": 0.01}, *calm]
    fig = plot_curves(logs, tmp_path / "c.png", "curves", {"vae": True, "lm": False})
    like = _panel(fig, "likelihood")
    train = {line.get_label(): list(line.get_ydata()) for line in like.lines}["vae -ELBO train"]
    assert 360.0 in train  # drawn, not dropped
    assert max(like.get_ylim()) < 100  # but the validations (62-66) set the scale
    assert "1 training window above the top, up to 360, clipped" in like.get_xlabel()
    # without a spike nothing is clipped and the label is the plain one
    fig = plot_curves(_logs(), tmp_path / "d.png", "curves", {"vae": True, "lm": False})
    assert _panel(fig, "likelihood").get_xlabel() == "optimizer step"


def test_curves_of_one_language_model_are_its_exact_nll(tmp_path):
    fig = plot_curves({"lm": _logs()["lm"]}, tmp_path / "c.png", "lm", {"lm": False})
    (ax,) = fig.axes
    assert "exact" in ax.get_title() and "-log p(x)" in ax.get_title()
    valid = [line for line in ax.get_lines() if line.get_label() == "validation"]
    assert list(valid[0].get_ydata()) == [63.0, 62.0]


def test_compare_of_a_vae_and_a_language_model(tiny_config, tmp_path, monkeypatch):
    runs = {
        name: train(
            tiny_config(**{"train.max_steps": 4, "train.eval_every": 2, **extra}), tmp_path / name
        )
        for name, extra in (("vae", {}), ("lm", {"model.name": "lstm_lm"}))
    }
    drawn = []
    original = report.plot_curves
    monkeypatch.setattr(
        report.compare, "plot_curves", lambda *a, **k: drawn.append(original(*a, **k))
    )
    compare_runs(list(runs.values()), tmp_path / "cmp")
    panels = _panels(drawn[0])
    like = next(labels for title, labels in panels.items() if title.startswith("likelihood"))
    assert "vae -ELBO valid" in like and "lm NLL valid (exact)" in like
    rec = next(labels for title, labels in panels.items() if title.startswith("reconstruction"))
    assert rec and not [x for x in rec if x.startswith("lm")]
    lm_valid = read_log(runs["lm"])["valid"]
    (nll,) = [
        line
        for line in _panel(drawn[0], "likelihood").get_lines()
        if line.get_label() == "lm NLL valid (exact)"
    ]
    assert list(nll.get_ydata()) == pytest.approx([-r["elbo"] for r in lm_valid])


def test_kl_per_dim_marks_the_free_bits_floor_on_an_axis_of_the_active_dimensions(tmp_path):
    kl = [2.5, 1.2, 0.15, 0.14, 1e-4, 2e-4]
    var = [0.5, 0.2, 3e-3, 2e-3, 4e-4, 1e-3]
    fig = plot_kl_per_dim(kl, var, 0.01, tmp_path / "k.png", "run", free_bits=0.15)
    top, bottom = fig.axes
    floor = [line for line in top.get_lines() if "free bits" in line.get_label()]
    assert len(floor) == 1 and list(floor[0].get_ydata()) == [0.15, 0.15]
    assert "0.15" in floor[0].get_label() and "per dimension" in floor[0].get_label()
    assert top.get_legend() is not None
    # the axis is spent on the dimensions that carry KL, not on decades below 1e-2
    assert top.get_yscale() == "linear" and top.get_ylim()[0] == 0
    assert 2.5 <= top.get_ylim()[1] < 3.5
    # the variance panel's log axis starts near the data, under the AU threshold
    low = bottom.get_ylim()[0]
    assert 1e-4 <= low <= 4e-4 and bottom.get_yscale() == "log"
    # no floor without free bits; a floor on the total KL is no per-dimension line
    fig = plot_kl_per_dim(kl, var, 0.01, tmp_path / "k.png", "run")
    assert not [x for x in fig.axes[0].get_lines() if "free bits" in x.get_label()]
    fig = plot_kl_per_dim(kl, var, 0.01, tmp_path / "k.png", "run", 2.0, "total")
    assert not [x for x in fig.axes[0].get_lines() if "free bits" in x.get_label()]
    assert "free bits 2.0 nats on the total KL" in fig.axes[0].get_title()


def test_report_draws_the_runs_free_bits_floor(tiny_config, tmp_path, monkeypatch):
    run = train(tiny_config(**{"train.max_steps": 2, "kl.free_bits": 0.1}), tmp_path / "vae")
    drawn = []
    original = report.plot_kl_per_dim
    monkeypatch.setattr(
        report.run_report, "plot_kl_per_dim", lambda *a, **k: drawn.append(original(*a, **k))
    )
    report.write_report(run, max_sentences=8, n_examples=1)
    floor = [x for x in drawn[0].axes[0].get_lines() if "free bits" in x.get_label()]
    assert list(floor[0].get_ydata()) == [0.1, 0.1]


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
