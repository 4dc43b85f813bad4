"""``textvae compare``: several runs' evaluations side by side, their training curves overlaid
and their rate-distortion plane, written to ``compare.md`` with its figures.

Units: nats per sentence (EOS counted) unless stated.
"""

from __future__ import annotations

from pathlib import Path

from textvae.report.paired import paired_differences
from textvae.report.plots import plot_curves, plot_rate_distortion
from textvae.report.tables import au_dimensions, evaluation_table, exact_nll
from textvae.rundir import CONFIG, best_evaluation, read_evaluations, read_log


def default_compare_dir(run_dirs: list[str | Path]) -> Path:
    """``compare-<run>-<run>...`` beside the first run (``compare-<first>-and-<n>-more`` when
    the names are long), never the working directory."""
    names = [Path(r).name for r in run_dirs]
    joined = "-".join(names)
    if len(joined) > 80:
        joined = f"{names[0]}-and-{len(names) - 1}-more"
    return Path(run_dirs[0]).parent / f"compare-{joined}"


def compare_runs(
    run_dirs: list[str | Path], output: str | Path | None = None, eval_name: str = "test"
) -> tuple[str, Path]:
    """Side-by-side evaluation table and an overlay of training curves.

    Args:
        run_dirs: run folders; each contributes its most complete evaluation of split
            ``eval_name`` (:func:`best_evaluation`; or the file ``eval_name`` when it names
            one, e.g. ``eval-test-full-K500-bf16``; a row of dashes if none) and ``log.jsonl``.
            The table names each row's file.
        output: folder for ``compare.md``, ``compare_curves.png`` and ``rate_distortion.png``
            (:func:`plot_rate_distortion`; created; those files are replaced); None:
            :func:`default_compare_dir`.

    Returns:
        (markdown text, output folder).

    Raises:
        FileNotFoundError: a folder has no ``log.jsonl``. ValueError: fewer than one run or
            two runs with the same folder name.
    """
    if not run_dirs:
        raise ValueError("compare needs at least one run folder")
    paths = [Path(r) for r in run_dirs]
    names = [p.name for p in paths]
    if len(set(names)) != len(names):
        raise ValueError(f"two runs share a folder name: {names}")
    runs = _read_runs(paths, eval_name)
    output = Path(output) if output is not None else default_compare_dir(paths)
    output.mkdir(parents=True, exist_ok=True)
    plot_curves(runs["logs"], output / "compare_curves.png", "training curves", runs["latent"])
    rows = runs["rows"]
    plot_rate_distortion(rows, output / "rate_distortion.png", f"rate-distortion ({eval_name})")
    notes = _notes(rows, runs["files"], runs["missing"], eval_name)
    paired = paired_differences(rows)
    text = "\n".join(
        [
            "# Run comparison",
            "",
            evaluation_table(rows, runs["dims"]),
            "",
            *[f"- {n}" for n in notes],
            "",
            *paired,
            "![training curves](compare_curves.png)",
            "",
            "![rate-distortion plane](rate_distortion.png)",
            "",
        ]
    )
    from textvae.atomic import write_text

    write_text(output / "compare.md", text)
    return text, output


def _sentence_set(record: dict) -> tuple:
    """What identifies the sentences an evaluation scored: its data file names, split and
    ``max_sentences`` (the first N in dataset order; None = all)."""
    data = record.get("data") or ""
    return (
        tuple(Path(f.strip()).name for f in data.split(",")),
        record.get("split"),
        record.get("max_sentences"),
    )


def _shared_evaluations(paths: list[Path], split: str) -> dict | None:
    """For a split (not a file name): each run's most complete evaluation of the largest
    sentence set that every run has evaluated, so that the runs are compared, and paired, on
    the same sentences (e.g. one run evaluated on the full split and on its first 3,761
    sentences, the other on those 3,761 only: both rows are of the 3,761). ``{run folder name:
    (file name, record)}``, or None when the runs share no sentence set (then each run's own
    most complete evaluation, :func:`textvae.rundir.best_evaluation`) or ``split`` names a
    file."""
    if split.startswith("eval-") or len(paths) < 2:
        return None
    evaluations = {
        path.name: [(n, r) for n, r in read_evaluations(path).items() if r.get("split") == split]
        for path in paths
    }
    sets = [
        {_sentence_set(r): r.get("n_sentences") or 0 for _, r in e} for e in evaluations.values()
    ]
    common = set.intersection(*(set(s) for s in sets))
    if not common:
        return None
    largest = max(common, key=lambda key: sets[0][key])
    return {  # read_evaluations lists each run's most complete first: the largest K of the set
        name: next((n, r) for n, r in e if _sentence_set(r) == largest)
        for name, e in evaluations.items()
    }


def _read_runs(paths: list[Path], eval_name: str) -> dict:
    """Each run's log, evaluation of ``eval_name`` and model facts, keyed by folder name:
    ``{"rows": evaluation (empty if none), "files": the evaluation's file, "missing": [names
    without one], "logs": read_log, "latent": has a latent, "dims": AU denominator}``."""
    from omegaconf import OmegaConf

    from textvae.models import MODELS

    runs: dict = {"rows": {}, "dims": {}, "logs": {}, "missing": [], "files": {}, "latent": {}}
    shared = _shared_evaluations(paths, eval_name)
    for path in paths:
        runs["logs"][path.name] = read_log(path)
        found = shared[path.name] if shared else best_evaluation(path, eval_name)
        if found is not None:
            runs["files"][path.name], runs["rows"][path.name] = found
        else:
            runs["rows"][path.name] = {}
            runs["missing"].append(path.name)
        cfg = OmegaConf.load(path / CONFIG)
        cls = MODELS[cfg.model.name]
        runs["latent"][path.name] = cls.has_latent
        runs["dims"][path.name] = au_dimensions(cls, cfg.model)
    return runs


def _notes(rows: dict[str, dict], files: dict[str, str], missing: list[str], eval_name: str):
    """compare.md's notes under the table: the files read, units, differing tokenizers, runs
    without an evaluation, differing IW sample counts."""
    notes = [
        "Evaluations (written by `textvae evaluate`; of the split "
        f"`{eval_name}`, the largest set of sentences that every run has evaluated, else each "
        "run's own largest; then the largest K): "
        + "; ".join(f"{n}: `{f}`" for n, f in files.items())
        + ". Nats per sentence with EOS counted; IW-NLL ± standard error over sentences"
        + (
            " (exact NLL for a language model, which has no latent)."
            if any(exact_nll(r) for r in rows.values())
            else "."
        )
    ]
    tokenizers = {n: r.get("tokenizer") for n, r in rows.items() if r.get("tokenizer")}
    if len(set(tokenizers.values())) > 1:
        notes.append(
            "Tokenizers differ ("
            + "; ".join(f"{n}: {t}" for n, t in tokenizers.items())
            + "): compare PPL per word, not per token."
        )
    if missing:
        notes.append(f"No evaluation of `{eval_name}` in: {', '.join(missing)}.")
    ks = {r["iw_samples"] for r in rows.values() if r.get("iw_samples")}
    if len(ks) > 1:
        notes.append(
            f"Runs use different IW sample counts {sorted(ks)}: NLLs are not equally tight."
        )
    return notes
