"""``textvae report``: one run's ``report.md`` (latent status, setup, evaluation table, training
curves, latent-space figures and examples), rebuilt in a temporary folder and renamed into place.

Units: nats per sentence (EOS counted) unless stated; BLEU 0-100; accuracies in percent.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from textvae.atomic import commit_dir, temp_dir
from textvae.report.plots import plot_curves, plot_kl_per_dim, plot_projection
from textvae.report.tables import evaluation_table, latent_status
from textvae.rundir import read_evaluations, read_log


def _precision_ran(requested: str, groups: dict[str, list[dict]]) -> str:
    """``requested``, or "bf16 requested, ran fp32" when training logged a ``precision`` event
    (no native bfloat16 on its device: :func:`textvae.precision.runnable_precision`)."""
    ran = {e["ran"] for e in groups.get("event", []) if e.get("event") == "precision"}
    return requested if not ran else f"{requested} requested, ran {', '.join(sorted(ran))}"


@torch.no_grad()
def write_report(
    run_dir: str | Path,
    split: str = "valid",
    max_sentences: int = 2000,
    n_examples: int = 5,
    seed: int = 0,
    label_names: dict[int, str] | None = None,
    progress: bool = False,
) -> Path:
    """Write ``RUN_DIR/report/`` (report.md, curves.png, and for latent models kl_per_dim.png
    and latent_pca.png) for a trained run.

    The latent diagnostics use the first ``max_sentences`` sentences of ``split`` (the run's
    corpus) through the best checkpoint: KL per dimension, AU, MI and the z-usage gap from
    :func:`textvae.metrics.evaluate` without IW samples; any ``eval-*.json`` of the run is
    tabulated as well. Examples (prior samples, reconstructions, one interpolation) are greedy
    decodings under a forked RNG seeded by ``seed``. ``progress``: a tqdm bar on stderr for the
    evaluation pass. A language model gets only what it has: the reconstruction curve, no KL
    schedule, no latent panels.

    Returns:
        The report folder.

    Raises:
        FileNotFoundError: not a run folder; textvae.rundir.RunDirError: no best checkpoint.
    """
    import textvae

    run_dir = Path(run_dir)
    groups = read_log(run_dir)
    model, tokenizer = textvae.load(run_dir)
    cfg = model.config
    data = _sentences(cfg, tokenizer, split, max_sentences, label_names)
    final = run_dir / "report"
    tmp = temp_dir(final)
    tmp.mkdir()
    name = run_dir.name
    plot_curves(
        {name: groups}, tmp / "curves.png", f"{name}: training curves", {name: model.has_latent}
    )
    quick = _quick_evaluation(model, data["dataset"], seed, progress)
    evaluations = read_evaluations(run_dir)
    latent_dim = math.prod(model.latent_shape) if model.has_latent else None
    n = len(data["texts"])
    sentences = f"first {n} sentences of the {split} split"
    md = _heading(name, model, quick, latent_dim, groups, sentences)
    md += _setup(model, groups, quick)
    md += _evaluation(evaluations, quick, f"{split}, first {n}", latent_dim, model.has_latent)
    md += _dispersion(quick) + _curves_section(model.has_latent)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model.has_latent:
            md += _latent_space(model, data, quick, tmp, name, split)
        if getattr(model, "conditional", False):
            md += _responses(model, data["contexts"][:n_examples], data["texts"])
        else:
            md += _examples(model, data["texts"], n_examples)
    (tmp / "report.md").write_text("\n".join(md) + "\n")
    commit_dir(tmp, final)
    return final


def _quick_evaluation(model, dataset, seed: int, progress: bool) -> dict:
    """The report's own pass: :func:`textvae.metrics.evaluate` without IW samples (sentences too
    long for the model skipped), at the run's ``eval.au_delta`` and ``eval.batch_size``."""
    from textvae.metrics import evaluate

    cfg = model.config
    return evaluate(
        model,
        dataset,
        iw_samples=0,
        au_delta=cfg.eval.au_delta,
        batch_size=cfg.eval.batch_size,
        seed=seed,
        skip_too_long=True,
        progress=progress,
    )


def _sentences(cfg, tokenizer, split: str, max_sentences: int, label_names) -> dict:
    """The first ``max_sentences`` sentences of the run's corpus ``split``: ``{"texts",
    "labels", "contexts" (None where the corpus has none), "label_names" (the corpus's when
    ``label_names`` is None), "dataset"}``."""
    from textvae.data import TextDataset, load_split
    from textvae.data import label_names as corpus_label_names

    corpus = load_split(cfg.data, split, whole=True)
    texts = corpus.texts[:max_sentences]
    labels = corpus.labels[:max_sentences] if corpus.labels else None
    contexts = corpus.contexts[:max_sentences] if corpus.contexts else None
    if label_names is None:
        label_names = corpus_label_names(cfg.data.corpus)
    dataset = TextDataset(texts, tokenizer, labels, contexts=contexts)
    return {
        "texts": texts,
        "labels": labels,
        "contexts": contexts,
        "label_names": label_names,
        "dataset": dataset,
    }


def _heading(name: str, model, quick: dict, latent_dim, groups: dict, sentences: str) -> list[str]:
    """The title, the latent status (from ``quick``, on ``sentences``) and the collapse
    warnings training logged."""
    t = model.config.train
    status = latent_status(
        quick["kl"] if model.has_latent else None,
        quick["z_gap"],
        quick["au"],
        latent_dim or 0,
        t.collapse_kl,
        t.collapse_z_gap,
    )
    warnings = groups.get("warning", [])
    md = [
        f"# Run report: `{name}`",
        "",
        f"Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `textvae report`.",
        "",
        f"**Latent status** ({sentences}, best checkpoint): {status}.",
        "",
    ]
    if warnings:
        md += [
            f"**Training warned of posterior collapse {len(warnings)} time(s)**, from step "
            f"{warnings[0]['step']} to {warnings[-1]['step']}: {warnings[-1]['message']}",
            "",
        ]
    return md


def _setup(model, groups: dict, quick: dict) -> list[str]:
    """The setup section: the model (:meth:`textvae.models.TextVAE.describe`), the KL schedule
    of a latent model, training and the tokenizer."""
    cfg = model.config
    m, k, t = cfg.model, cfg.kl, cfg.train
    train_steps = max((r.get("step", 0) for g in groups.values() for r in g), default=0)
    return [
        "## Setup",
        "",
        f"- model `{m.name}`: {model.describe(m)}",
        *(
            [
                f"- KL: schedule `{k.schedule}` (beta {k.beta_start} → {k.beta_max} over "
                f"{k.warmup_steps} steps), free bits {k.free_bits} ({k.free_bits_mode})"
            ]
            if model.has_latent
            else []
        ),
        f"- training: {train_steps} optimizer steps, batch {t.batch_size}, `{t.optimizer}` lr "
        f"{t.lr}, precision {_precision_ran(t.precision, groups)}; corpus "
        f"`{cfg.data.corpus or cfg.data.train_path}`",
        f"- tokenizer: {quick['tokenizer']}",
        "",
    ]


def _evaluation(
    evaluations: dict[str, dict], quick: dict, where: str, latent_dim, has_latent: bool
) -> list[str]:
    """The evaluation section: one row per ``eval-*.json`` of the run (the most complete of
    each split marked), and last this report's own pass ``quick`` on ``where``."""
    preferred = {}  # split -> its most complete evaluation (read_evaluations: most complete first)
    for file, e in evaluations.items():
        preferred.setdefault(e.get("split"), file)
    rows = {
        f"`{file}`"
        + (
            " (most complete)"
            if preferred.get(e.get("split")) == file and len(evaluations) > 1
            else ""
        ): e
        for file, e in evaluations.items()
    }
    how = "no IW" if has_latent else "exact NLL"
    rows[f"{where} (this report, {how})"] = quick
    return [
        "## Evaluation",
        "",
        "Each row names the file its numbers come from (`textvae evaluate` outputs in the run "
        "folder, the most complete of each split first: more sentences, then larger K); the "
        f"last row is this report's own {'single-sample' if has_latent else 'exact'} "
        "pass. Units: nats per sentence (EOS "
        "counted)" + (f"; MI {quick['mi_estimator']}." if has_latent else "."),
        "",
        evaluation_table(rows, {r: latent_dim for r in rows} if latent_dim else None),
        "",
    ]


def _dispersion(quick: dict) -> list[str]:
    """Long et al. 2019's encoder feature dispersion of the report's pass, or why it is not
    measured; nothing when the evaluation has neither."""
    disp = quick.get("encoder_dispersion") or {}
    if disp.get("total_variance") is not None:
        return [
            f"Encoder feature dispersion (Long et al. 2019; the {disp['dim']}-dimensional "
            f"summaries the posterior heads read, over the {disp['n']} sentences above): mean "
            f"pairwise cosine distance {disp['mean_cosine_distance']:.4f}, total variance "
            f"{disp['total_variance']:.4g} ({disp['relative_variance']:.4f} of the mean "
            "squared norm); the curves below follow it over training.",
            "",
        ]
    if disp.get("reason"):
        return [f"Encoder feature dispersion: not measured ({disp['reason']}).", ""]
    return []


def _curves_section(has_latent: bool) -> list[str]:
    """The training curves section (``curves.png``) and its caption."""
    return [
        "## Training curves",
        "",
        "![training curves](curves.png)",
        "",
        "Thin lines: means over `train.log_every` training steps; markers: validations "
        + (
            "(single-sample ELBO terms on the validation split)."
            if has_latent
            else "(the exact -log p(x) on the validation split; a language model has no "
            "latent, so no KL to draw)."
        ),
        "",
    ]


def _latent_space(model, data: dict, quick: dict, folder: Path, name: str, split: str):
    """Draw ``kl_per_dim.png`` and ``latent_pca.png`` into ``folder`` from the posterior means
    of ``data``'s sentences; return the section that shows them."""
    from textvae.metrics import active_units

    cfg = model.config
    dataset = data["dataset"]
    q = model.posterior(dataset.collate(list(range(len(dataset)))))
    mu = q.mean.float().flatten(1)  # DELLA's (N, L, D) as (N, L * D), layer-major
    _, var = active_units(mu, cfg.eval.au_delta)
    kl_dims = quick["kl_per_dim"]
    if kl_dims and isinstance(kl_dims[0], list):
        kl_dims = [v for row in kl_dims for v in row]
    plot_kl_per_dim(
        kl_dims,
        var.tolist(),
        cfg.eval.au_delta,
        folder / "kl_per_dim.png",
        name,
        cfg.kl.free_bits,
        cfg.kl.free_bits_mode,
        kl_total=quick["kl"],
    )
    lengths = [len(s.split()) for s in data["texts"]]
    plot_projection(
        mu,
        folder / "latent_pca.png",
        f"{name} ({split} split)",
        data["labels"],
        lengths,
        data["label_names"],
    )
    return [
        "## Latent space",
        "",
        "![KL per dimension](kl_per_dim.png)",
        "",
        "![posterior means, PCA](latent_pca.png)",
        "",
    ]


def _responses(model, shown: list[str], texts: list[str]) -> list[str]:
    """A conditional model's examples: three responses to each context of ``shown`` (greedy from
    z ~ p(z|c); ancestral samples without latent) beside the reference ``texts``."""
    from textvae.generate import respond

    how = (
        "three z ~ p(z|c) each, greedy decoding"
        if model.has_latent
        else "no latent: three samples each, ancestral sampling"
    )
    answers = respond(model, shown, 3, strategy="greedy" if model.has_latent else "sample")
    md = [
        "## Examples",
        "",
        f"Responses to the first contexts ({how}):",
        "",
        "| context | reference | responses |",
        "|---|---|---|",
    ]
    return md + [
        f"| {c} | {r} | {' / '.join(a or '(empty)' for a in group)} |"
        for c, r, group in zip(shown, texts, answers, strict=False)
    ]


def _examples(model, texts: list[str], n_examples: int) -> list[str]:
    """Markdown lines: prior samples (greedy from z ~ p(z); ancestral samples of a model
    without latent), and for a latent model reconstructions and one interpolation (greedy)."""
    from textvae.generate import interpolate, reconstruct, sample_prior

    how = (
        "Prior samples (z ~ p(z), greedy decoding):"
        if model.has_latent
        else "Samples (no latent: ancestral sampling from p(x)):"
    )
    strategy = "greedy" if model.has_latent else "sample"
    md = ["## Examples", "", how, ""]
    md += [
        f"{i + 1}. {s or '(empty)'}"
        for i, s in enumerate(sample_prior(model, n_examples, strategy=strategy))
    ]
    if not model.has_latent:
        return md
    inputs = texts[:n_examples]
    outputs = reconstruct(model, inputs, strategy="greedy")
    md += [
        "",
        "Reconstructions (greedy from the posterior mean):",
        "",
        "| input | reconstruction |",
        "|---|---|",
    ]
    md += [f"| {a} | {b or '(empty)'} |" for a, b in zip(inputs, outputs, strict=True)]
    if len(texts) >= 2:
        a, b = texts[0], texts[min(len(texts) - 1, n_examples)]
        steps = interpolate(model, a, b, steps=5, strategy="greedy")
        md += [
            "",
            "Interpolation between two posterior means (linear, 5 points, greedy):",
            "",
            f"- **from** {a}",
        ]
        md += [f"- {i / 4:.2f}: {s or '(empty)'}" for i, s in enumerate(steps)]
        md += [f"- **to** {b}"]
    return md
