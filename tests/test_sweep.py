"""textvae sweep (Optuna): grids, resumption after a kill, parallel workers, bad files; the
rate-distortion plot."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf

from tests.conftest import tiny_overrides
from textvae.report import compare_runs, plot_rate_distortion
from textvae.sweep import SweepError, load_sweep, run_sweep
from textvae.train import train

ROOT = Path(__file__).resolve().parent.parent


def _write_preset(tiny_corpus: Path) -> Path:
    """The tiny test config as a preset YAML next to the corpus."""
    items = dict(o.split("=", 1) for o in tiny_overrides(tiny_corpus))
    cfg = OmegaConf.from_dotlist([f"{k}={v}" for k, v in items.items()])
    path = tiny_corpus / "tiny.yaml"
    OmegaConf.save(cfg, path)
    return path


def _write_sweep(folder: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def _trials(folder: Path, name: str):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'study.db'}").trials


GRID = """
base: tiny.yaml
entries:
  lm: [model.name=lstm_lm]
  vae: []
  fb: {overrides: [kl.free_bits=0.5]}
space:
  model.word_dropout: {grid: [0.0, 0.25]}  # a key of both models (lstm_lm has no pooling)
budget: {max_steps: 3}
evaluation: {max_sentences: 8, iw_samples: 2}
objectives: {nll: minimize, mi: maximize}
study: {heartbeat_seconds: 1}
"""


def test_grid_sweep_runs_exactly_its_grid_and_writes_the_summary(tiny_corpus):
    _write_preset(tiny_corpus)
    path = _write_sweep(tiny_corpus, GRID, "grid.yaml")
    out, summary = run_sweep(path, tiny_corpus / "out", train=train)
    trials = _trials(out, "grid")
    assert len(trials) == 6 and all(t.state.name == "COMPLETE" for t in trials)
    points = sorted((t.params["entry"], t.params["model.word_dropout"]) for t in trials)
    assert points == sorted(itertools.product(["lm", "vae", "fb"], [0.0, 0.25]))
    rows = {}
    for t in trials:
        folder = out / t.user_attrs["run_dir"]
        assert folder.name == f"trial-{t.number:04d}-{t.params['entry']}"
        config = OmegaConf.load(folder / "config.yaml")  # an ordinary run folder
        assert config.model.word_dropout == t.params["model.word_dropout"]
        assert config.train.max_steps == 3
        assert config.kl.free_bits == (0.5 if t.params["entry"] == "fb" else 0.0)
        assert config.model.name == ("lstm_lm" if t.params["entry"] == "lm" else "lstm_vae")
        result = json.loads((folder / "eval-valid.json").read_text())
        assert result["n_sentences"] == 8 and result["split"] == "valid"
        expected_mi = -float("inf") if result["mi"] is None else result["mi"]  # LM: no latent
        assert t.values == [pytest.approx(result["nll"]), pytest.approx(expected_mi)]
        rows[folder.name] = result
    md = (out / "sweep.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| trial-")]
    assert len(table) == 12  # the trial table and the evaluation table
    assert "split **valid**" in md and "- fb: `kl.free_bits=0.5`" in md
    lm_rows = [line for line in table if "entry=lm" in line]
    assert len(lm_rows) == 2 and all("inf" not in line and ", –" in line for line in lm_rows)
    pareto = {
        t.number
        for t in optuna.load_study(
            study_name="grid", storage=f"sqlite:///{out / 'study.db'}"
        ).best_trials
    }
    assert set(summary["pareto"]) == pareto and pareto
    assert sum("★" in line for line in table) == len(pareto)
    # the rate-distortion plot: one point per VAE trial at (kl, rec), the LMs as references
    plot = summary["plot"]
    assert (out / "rate_distortion.png").stat().st_size > 10_000
    drawn = {p["name"]: (p["rate"], p["distortion"]) for p in plot["points"]}
    assert drawn == {n: (r["kl"], r["rec"]) for n, r in rows.items() if r["kl"] is not None}
    assert sorted(m["nll"] for m in plot["lm"]) == sorted(
        r["nll"] for r in rows.values() if r["kl"] is None
    )
    # running it again finds every trial finished: nothing is trained again
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("trial-*/checkpoints/last/*")}
    run_sweep(path, tiny_corpus / "out", train=train)
    assert len(_trials(out, "grid")) == 6
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("trial-*/checkpoints/last/*")}
    # compare draws the same plane for run folders
    folders = sorted(out.glob("trial-*"))
    text, cmp = compare_runs(folders, tiny_corpus / "cmp", "eval-valid")
    assert (cmp / "rate_distortion.png").is_file() and "rate_distortion.png" in text


def test_killed_sweep_continues_without_rerunning_finished_trials(tiny_corpus):
    """`textvae sweep` killed once trial 0 is evaluated and trial 1 has a checkpoint: the same
    command finishes the study; trial 0 is not trained again and trial 1 resumes its folder."""
    _write_preset(tiny_corpus)
    path = _write_sweep(
        tiny_corpus,
        """
base: tiny.yaml
space:
  kl.free_bits: {low: 0.0, high: 0.5}
budget: {trials: 3, max_steps: 60}
overrides: [train.eval_every=10, train.valid_limit_eval=8]
evaluation: {max_sentences: 8, iw_samples: 2}
study: {sampler: random, heartbeat_seconds: 1}
""",
        "search.yaml",
    )
    out = tiny_corpus / "out"
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    command = [sys.executable, "-m", "textvae.cli", "sweep", str(path), "--out-dir", str(out)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_eval = out / "trial-0000" / "eval-valid.json"
    second_ckpt = out / "trial-0001" / "checkpoints" / "last"
    deadline = time.time() + 240
    while not (first_eval.is_file() and second_ckpt.is_dir()):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "trial-0001" / "trial.json").is_file()  # cut off mid-training
    states = {t.number: t.state.name for t in _trials(out, "search")}
    assert states == {0: "COMPLETE", 1: "RUNNING"}
    first_weights = out / "trial-0000" / "checkpoints" / "last" / "model.safetensors"
    stamp = first_weights.stat().st_mtime_ns

    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    trials = _trials(out, "search")
    finished = [t for t in trials if t.state.name == "COMPLETE"]
    identities = sorted(t.system_attrs.get("failed_trial", t.number) for t in finished)
    # three trials, each once; the dead one retried under its own number (its retry took
    # number 2, so the third trial is number 3)
    assert len(identities) == 3 and len(set(identities)) == 3 and identities[:2] == [0, 1]
    assert first_weights.stat().st_mtime_ns == stamp  # trial 0 was not trained again
    retried = next(t for t in finished if t.system_attrs.get("failed_trial") == 1)
    assert retried.params == next(t for t in trials if t.number == 1).params
    events = [json.loads(line) for line in open(out / "trial-0001" / "log.jsonl")]
    assert any(e.get("event") == "resume" for e in events)  # its run folder was resumed
    assert max(e["step"] for e in events if e.get("type") == "train") == 60
    assert sorted(p.name for p in out.glob("trial-*")) == [f"trial-{i:04d}" for i in identities]
    assert "trial-0001" in (out / "sweep.md").read_text()


def test_two_workers_share_one_sqlite_study_without_duplicates(tiny_corpus):
    _write_preset(tiny_corpus)
    path = _write_sweep(
        tiny_corpus,
        """
base: tiny.yaml
space:
  model.pooling: {grid: [last, max]}
  kl.free_bits: {grid: [0.0, 0.5]}
budget: {max_steps: 3}
evaluation: {max_sentences: 8, iw_samples: 2}
study: {heartbeat_seconds: 1}
""",
        "pair.yaml",
    )
    out, summary = run_sweep(path, tiny_corpus / "out", jobs=2, train=train)
    trials = [t for t in _trials(out, "pair") if not t.user_attrs.get("overflow")]
    assert all(t.state.name == "COMPLETE" for t in trials)
    points = sorted((t.params["model.pooling"], t.params["kl.free_bits"]) for t in trials)
    assert points == sorted(itertools.product(["last", "max"], [0.0, 0.5]))  # once each
    assert len({t.user_attrs["run_dir"] for t in trials}) == 4
    assert len(list(out.glob("trial-*"))) == 4
    assert len(summary["trials"]) == 4


@pytest.mark.parametrize(
    "text, key",
    [
        ("base: tiny.yaml\nbogus: 1\n", "'bogus': unknown key"),
        ("base: missing.yaml\n", "'base': preset not found"),
        (
            "base: tiny.yaml\nspace:\n  model.nonsense: {choices: [1, 2]}\nbudget: {trials: 2}\n",
            "unknown config key 'model.nonsense'",
        ),
        (
            "base: tiny.yaml\nspace:\n  kl.free_bits: {low: 0.5, high: 0.1}\nbudget: {trials: 2}\n",
            "'space.kl.free_bits': low (0.5) is above high",
        ),
        (
            "base: tiny.yaml\nspace:\n  kl.free_bits: {grid: [0.1]}\n  train.lr: {low: 0.1, high: 1}\n",
            "'space': mixes grid and sampled",
        ),
        (
            "base: tiny.yaml\nspace:\n  kl.free_bits: {grid: [0.1, 0.2]}\nbudget: {trials: 5}\n",
            "'budget.trials': the grid has 2 points",
        ),
        (
            "base: tiny.yaml\nobjectives: {loss: minimize}\n",
            "'objectives.loss': not an evaluation field",
        ),
        (
            "base: tiny.yaml\nobjectives: {nll: lower}\n",
            "'objectives.nll': 'lower' is not minimize",
        ),
        ("base: tiny.yaml\nevaluation: {split: dev}\n", "'evaluation.split': 'dev'"),
        (
            "base: tiny.yaml\nspace:\n  train.lr: {low: 0.1, high: 1}\n",
            "'budget.trials': a sampled",
        ),
        ("entries:\n  a: [kl.free_bits=0.1]\n", "'entries.a': no preset"),
        ("base: tiny.yaml\nentries:\n  a: [kl.free_bits]\n", "'entries.a': expected a list"),
        ("base: tiny.yaml\nentries:\n  a: [model.pooling=diagonal]\n", "'entries.a'"),
        ("base: [unclosed\n", "cannot parse YAML"),
    ],
)
def test_bad_sweep_files_give_errors_naming_file_and_key(tiny_corpus, text, key):
    _write_preset(tiny_corpus)
    path = _write_sweep(tiny_corpus, text, "bad.yaml")
    with pytest.raises(SweepError) as err:
        load_sweep(path)
    assert key in str(err.value) and str(path) in str(err.value)


def test_a_sweep_folder_refuses_another_sweep(tiny_corpus):
    _write_preset(tiny_corpus)
    out = tiny_corpus / "out"
    out.mkdir()
    (out / "sweep.yaml").write_text("base: other.yaml\n")
    path = _write_sweep(tiny_corpus, GRID, "grid.yaml")
    with pytest.raises(SweepError, match="holds a different sweep"):
        run_sweep(path, out, train=train)
    assert sorted(p.name for p in out.iterdir()) == ["sweep.yaml"]


def test_rate_distortion_plot_returns_what_it_draws(tmp_path):
    rows = {
        "lm": {"kl": None, "rec": 119.8, "nll": 119.84},
        "vae": {"kl": 0.01, "rec": 119.99, "nll": 119.91, "mi": 0.003, "au": 0},
        "bow": {"kl": 2.17, "rec": 117.81, "nll": 119.25, "mi": 1.90, "au": 21},
        "missing": {},
    }
    drawn = plot_rate_distortion(rows, tmp_path / "rd.png", "test")
    assert (tmp_path / "rd.png").stat().st_size > 10_000
    assert [(p["name"], p["rate"], p["distortion"]) for p in drawn["points"]] == [
        ("vae", 0.01, 119.99),
        ("bow", 2.17, 117.81),
    ]
    assert drawn["lm"] == [{"name": "lm", "nll": 119.84}]
    lines = drawn["elbo_lines"]
    steps = {round(b - a, 6) for a, b in zip(lines, lines[1:], strict=False)}
    assert len(steps) == 1  # equally spaced lines of equal ELBO
    assert lines[0] <= 117.81 + 2.17 and lines[-1] >= 119.99 + 0.01  # they span the points


@pytest.mark.parametrize(
    "path", sorted((ROOT / "experiments").glob("*.yaml")), ids=lambda p: p.name
)
def test_experiment_files_are_valid_sweeps(path):
    """Every multi-run experiment of docs/results/ is a sweep file whose presets and keys load
    (each entry's config, each parameter at its ends)."""
    sweep = load_sweep(path)
    assert sweep.trials >= 1 and sweep.objectives


def test_remedy_matrix_entries_match_the_remedy_presets():
    """The matrix's entries are the remedy presets' settings (bench/matrix.py checked the same):
    base preset + entry == the preset YAML, with the matrix's common overrides on both."""
    import dataclasses

    from textvae.config import load_config
    from textvae.sweep import config_of

    sweep = load_sweep(ROOT / "experiments" / "remedy-matrix.yaml")
    presets = {
        "lm": "lstm-lm-cpu.yaml",
        "bn": "lstm-vae-bn-cpu.yaml",
        "bow": "lstm-vae-bow-cpu.yaml",
        "minrate": "lstm-vae-minrate-cpu.yaml",
        "flow": "flow-vrae-cpu.yaml",
        "anneal": "lstm-vae-cpu.yaml",
    }
    # where the preset deliberately departs from the matrix's measured entry: the matrix ran
    # BN-VAE with BatchNorm's eps 1e-5 and found the encoder escaping the floor through it
    departures = {"bn": ["model.posterior_bn_eps=1e-5"]}
    for name, preset in presets.items():
        from_preset = load_config(
            ROOT / "configs" / "ptb" / preset,
            sweep.overrides + sweep.budget + departures.get(name, []),
        )
        assert dataclasses.asdict(config_of(sweep, name, {})) == dataclasses.asdict(from_preset), (
            name
        )


def test_median_pruning_stops_a_trial_worse_than_the_median(tiny_corpus):
    """study.pruner: median: a trial that cannot learn (lr 1e-7) is stopped at a validation where
    its -ELBO is above the finished trial's at the same step; its run folder stays resumable."""
    _write_preset(tiny_corpus)
    path = _write_sweep(
        tiny_corpus,
        """
base: tiny.yaml
overrides: [train.eval_every=5]
entries:
  good: [train.lr=0.01]
  bad: [train.lr=1.0e-7]
budget: {max_steps: 20}
evaluation: {max_sentences: 8, iw_samples: 2}
objectives: {nll: minimize}
study: {pruner: median, pruner_startup_trials: 1, heartbeat_seconds: 1, seed: 1}
""",
        "prune.yaml",
    )
    out, summary = run_sweep(path, tiny_corpus / "out", train=train)
    trials = {t.params["entry"]: t for t in _trials(out, "prune")}
    # GridSampler(seed 1) runs good first, then bad (what the pruner needs here)
    assert [trials[n].number for n in ("good", "bad")] == [0, 1]
    assert trials["bad"].state.name == "PRUNED" and trials["good"].state.name == "COMPLETE"
    steps = [
        json.loads(line)["step"]
        for line in open(out / "bad" / "log.jsonl")
        if json.loads(line)["type"] == "valid"
    ]
    assert max(steps) < 20 and (out / "bad" / "checkpoints" / "last").is_dir()
    assert not (out / "bad" / "eval-valid.json").exists()
    assert "PRUNED" in (out / "sweep.md").read_text()
    with pytest.raises(SweepError, match="study.pruner"):
        load_sweep(
            _write_sweep(
                tiny_corpus,
                "base: tiny.yaml\nobjectives: {nll: minimize, mi: "
                "maximize}\nstudy: {pruner: median}\n",
                "bad.yaml",
            )
        )


def test_minutes_budget_and_storage_url(tiny_corpus):
    """budget.minutes: no trial starts after the time is up; --storage puts the study where the
    URL says (here another SQLite file; postgresql:// URLs work the same way)."""
    _write_preset(tiny_corpus)
    path = _write_sweep(
        tiny_corpus,
        GRID.replace("budget: {max_steps: 3}", "budget: {max_steps: 3, minutes: 1.0e-6}"),
    )
    url = f"sqlite:///{tiny_corpus / 'elsewhere.db'}"
    out, summary = run_sweep(path, tiny_corpus / "out", storage=url, train=train)
    assert (tiny_corpus / "elsewhere.db").is_file() and not (out / "study.db").exists()
    assert summary["trials"] == [] and not list(out.glob("trial-*"))
    assert "0 of 6 trials" in (out / "sweep.md").read_text()


def test_nsga2_sweep_evolves_within_its_trial_budget(tiny_corpus):
    """With Optuna's default population of 50, a multi-objective sweep of fewer than 50 trials
    is a random search (every trial in generation 0); the sweep's default population is a
    quarter of the budget (at least 4), so 12 trials run generations beyond the first."""
    from textvae.sweep import nsga2_population, open_study

    _write_preset(tiny_corpus)
    path = _write_sweep(
        tiny_corpus,
        """
base: tiny.yaml
space:
  model.word_dropout: {low: 0.0, high: 0.5}
budget: {trials: 12, max_steps: 3}
objectives: {nll: minimize, mi: maximize}
""",
    )
    sweep = load_sweep(path)
    assert sweep.sampler == "nsga2" and sweep.population_size == nsga2_population(12) == 4
    assert nsga2_population(16) == 4 and nsga2_population(400) == 50
    study = open_study(sweep, f"sqlite:///{tiny_corpus / 'ga.db'}")

    def objective(trial):
        x = trial.suggest_float("model.word_dropout", 0.0, 0.5)
        return x, -((x - 0.25) ** 2)

    study.optimize(objective, n_trials=12)
    generations = [t.system_attrs.get("NSGAIISampler:generation", 0) for t in study.trials]
    assert max(generations) >= 2, generations
    bad = _write_sweep(
        tiny_corpus,
        "base: tiny.yaml\nspace:\n  model.word_dropout: {low: 0.0, high: 0.5}\nbudget: {trials: 4}\nobjectives: {nll: minimize, mi: maximize}\nstudy: {population_size: 1}\n",
        "bad.yaml",
    )
    with pytest.raises(SweepError, match="study.population_size"):
        load_sweep(bad)
