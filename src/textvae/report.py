"""Run reports and run comparison: is the latent alive, and what does it encode?

:func:`write_report` turns a run folder into ``RUN_DIR/report/`` (``report.md`` plus PNG plots
drawn with matplotlib); :func:`compare_runs` puts several runs' evaluation JSONs side by side
and overlays their training curves. Everything is read from the run folder (``config.yaml``,
``log.jsonl``, ``eval-*.json``, the best checkpoint); nothing in it is changed except the
``report/`` folder, which is rebuilt in a temporary folder and renamed into place.

Units: nats per sentence (EOS counted) unless stated; BLEU 0-100; accuracies in percent.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

# the evaluation fields shown in tables: key, header (with units), format
TABLE_FIELDS = (
    ("rec", "rec (nats/sent)", "{:.2f}"),
    ("kl", "KL (nats/sent)", "{:.3f}"),
    ("elbo", "ELBO (nats/sent)", "{:.2f}"),
    ("nll", "IW-NLL (nats/sent)", None),  # with its standard error
    ("ppl_word", "PPL (per word)", "{:.1f}"),
    ("mi", "MI (nats)", "{:.3f}"),
    ("au", "AU", None),  # with its delta and the latent size
    ("z_gap", "z-usage gap (nats/sent)", "{:.3f}"),
    ("rec_bleu", "rec BLEU", "{:.1f}"),
    ("self_bleu", "self-BLEU", "{:.1f}"),
    ("distinct_1", "distinct-1", "{:.3f}"),
    ("distinct_2", "distinct-2", "{:.3f}"),
    ("iw_samples", "K", "{}"),
    ("n_sentences", "sentences", "{}"),
)


def read_log(run_dir: str | Path) -> dict[str, list[dict]]:
    """The records of ``RUN_DIR/log.jsonl`` grouped by their ``type`` (train, valid, warning,
    event), in file order. A resumed run's records are kept as written.

    Raises:
        FileNotFoundError: no ``log.jsonl``. ValueError: a line is not JSON (the line number
            is given).
    """
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no log.jsonl (is it a run folder?)")
    groups: dict[str, list[dict]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON record ({err})") from err
        groups.setdefault(record.get("type", "other"), []).append(record)
    return groups


def evaluation_name(what: str, n_sentences: int | None, iw_samples: int | None, precision: str,
                    generation: bool = False) -> str:
    """The file stem of an evaluation, naming what it is: ``eval-<split or file stem>-<full or
    N sentences>[-K<k>]-<precision>[-gen]``, e.g. ``eval-test-full-K500-bf16``.

    Args:
        what: the split (``test``) or the evaluated file's stem.
        n_sentences: None for the whole split or file, else the count evaluated.
        iw_samples: K, or None for a model without latent (its likelihood is exact).
        generation: whether generation metrics are included.
    """
    parts = ["eval", what, "full" if n_sentences is None else str(n_sentences)]
    if iw_samples is not None:
        parts.append(f"K{iw_samples}")
    parts.append(precision)
    if generation:
        parts.append("gen")
    return "-".join(parts)


def read_evaluations(run_dir: str | Path) -> dict[str, dict]:
    """``{file name: evaluation dict}`` of every ``eval-*.json`` in the run folder, the old
    ``eval-<split>.json`` names included, most complete first (:func:`completeness`).

    Raises:
        ValueError: a file is not valid JSON (the file is named).
    """
    found = [(path, _read_json(path)) for path in Path(run_dir).glob("eval-*.json")]
    found.sort(key=lambda item: completeness(item[1], item[0]), reverse=True)
    return {path.name: record for path, record in found}


def completeness(record: dict, path: Path | None = None) -> tuple:
    """Sort key of evaluations of one split, larger = more complete: more sentences (the full
    set over a subset), then more importance samples K (an exact likelihood counts as the most),
    then fp32 over bf16, then the newer file."""
    k = record.get("iw_samples")
    if k is None and record.get("nll") is not None:
        k = math.inf  # exact -log p(x) of a model without latent
    return (record.get("n_sentences") or 0, k or 0, record.get("precision") == "fp32",
            path.stat().st_mtime if path is not None else 0.0)


def best_evaluation(run_dir: str | Path, which: str = "test") -> tuple[str, dict] | None:
    """The most complete evaluation (:func:`completeness`) of split ``which``, or the file
    ``which`` (a name with or without ``.json``) when it exists: (file name, record), or None.

    Raises:
        ValueError: a file is not valid JSON (the file is named).
    """
    run_dir = Path(run_dir)
    for name in (which, f"{which}.json"):
        if name.startswith("eval-") and (run_dir / name).is_file():
            return name, _read_json(run_dir / name)
    split = which.removeprefix("eval-")
    for name, record in read_evaluations(run_dir).items():
        if record.get("split") == split:
            return name, record
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a JSON evaluation record ({err})") from err


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.grid": True,
                         "grid.alpha": 0.3, "figure.dpi": 110})
    return plt


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


CURVES = (  # (record type, key, title)
    ("rec", "reconstruction  -log p(x|z)  (nats/sentence)"),
    ("kl", "KL(q(z|x) || p(z))  (nats/sentence)"),
    ("beta", "KL weight beta"),
    ("mi", "mutual information I(x; z)  (nats)"),
    ("au", "active units (dimensions)"),
    ("z_gap", "z-usage gap  (nats/sentence)"),
)


LM_CURVES = (("rec", "-log p(x)  (nats/sentence)"),)  # a language model has nothing else


def plot_curves(runs: dict[str, dict[str, list[dict]]], path: str | Path, title: str,
                has_latent: bool = True) -> Path:
    """Training curves against optimizer step, one panel per quantity of :data:`CURVES` (of
    :data:`LM_CURVES` when ``has_latent`` is False: a language model has no KL, beta or latent).

    Args:
        runs: ``{label: read_log(run)}``; one run draws training windows (thin) and
            validations (markers); several runs overlay their validation curves (the training
            windows of rec and KL too, thin).
        path: PNG to write.
    """
    plt = _pyplot()
    curves = CURVES if has_latent else LM_CURVES
    fig, axes = plt.subplots(*((2, 3) if has_latent else (1, 1)),
                             figsize=(14, 7.5) if has_latent else (7, 4.5),
                             constrained_layout=True, squeeze=False)
    single = len(runs) == 1
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, groups) in enumerate(runs.items()):
        color = colors[i % len(colors)]
        train, valid = groups.get("train", []), groups.get("valid", [])
        for ax, (key, panel) in zip(axes.flat, curves, strict=True):
            if key in ("rec", "kl", "beta"):
                x, y = _series(train, key)
                if x:
                    ax.plot(x, y, color=color, lw=0.8, alpha=0.45 if key != "beta" else 1.0,
                            marker="." if len(x) < 3 else None,
                            label=(f"{label} train" if not single else "train (window mean)"))
            if key != "beta":
                x, y = _series(valid, key)
                if x:
                    ax.plot(x, y, "o-", color=color if not single else colors[1], ms=4, lw=1.5,
                            label=(f"{label} valid" if not single else "validation"))
            ax.set_title(panel)
            ax.set_xlabel("optimizer step")
    keys = [k for k, _ in curves]
    if "au" in keys and axes.flat[keys.index("au")].lines:
        axes.flat[keys.index("au")].set_ylim(bottom=0)  # a count: start at 0, so a flat 32 does not look like noise
    for ax in axes.flat:
        if ax.lines:
            ax.legend(fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, "not logged by this run", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
    fig.suptitle(title)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_kl_per_dim(
    kl_dims: list[float] | None, mu_var: list[float], delta: float, path: str | Path, title: str,
    kl_total: float | None = None,
) -> Path:
    """Two aligned bar charts over latent dimensions: KL per dimension (nats/sentence, log
    scale) and Var_x(E_q[z|x]) with the active-unit threshold delta as a line; active
    dimensions are coloured in both panels. ``kl_dims`` None (a flow posterior or prior has no
    per-dimension KL) draws the variance panel only, with ``kl_total`` (Monte Carlo) in the title.
    """
    plt = _pyplot()
    d = len(mu_var)
    active = [v > delta for v in mu_var]
    colors = ["#d62728" if a else "#7f7f7f" for a in active]
    floor = 1e-5
    width = max(7.0, 0.28 * d + 2)
    if kl_dims is not None:
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(width, 6.5), sharex=True,
                                          constrained_layout=True)
        top.bar(range(d), [max(k, floor) for k in kl_dims], color=colors)
        top.set_yscale("log")
        top.set_ylim(bottom=floor)
        top.set_ylabel("KL per dimension\n(nats/sentence, log)")
        heading, kl_text = top, f"KL total {sum(kl_dims):.3f} nats"
    else:
        fig, bottom = plt.subplots(figsize=(width, 3.8), constrained_layout=True)
        heading = bottom
        kl_text = ("no per-dimension KL (flow): Monte Carlo KL total "
                   + (f"{kl_total:.3f} nats" if kl_total is not None else "n/a"))
    heading.set_title(f"{title}\n{kl_text}\n{sum(active)}/{d} active units (red) at delta = {delta}")
    bottom.bar(range(d), [max(v, floor) for v in mu_var], color=colors)
    bottom.axhline(delta, color="black", ls="--", lw=1.2, label=f"AU threshold delta = {delta}")
    bottom.set_yscale("log")
    bottom.set_ylim(bottom=floor)
    bottom.set_ylabel("Var over sentences of\nposterior mean (log)")
    bottom.set_xlabel("latent dimension")
    bottom.legend(loc="upper right", fontsize=8, framealpha=1.0)
    step = 1 if d <= 40 else max(1, d // 32)
    bottom.set_xticks(range(0, d, step))
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_projection(
    mu: torch.Tensor, path: str | Path, title: str, labels: list[int] | None = None,
    lengths: list[int] | None = None, label_names: dict[int, str] | None = None,
) -> Path:
    """2-D PCA of posterior means (N, D): coloured by label where labels exist, else by
    sentence length in words (colour bar). Axis labels give each component's share of variance.
    """
    import numpy as np
    from sklearn.decomposition import PCA

    plt = _pyplot()
    x = mu.double().numpy()
    pca = PCA(n_components=2, random_state=0)
    xy = pca.fit_transform(x) if x.shape[1] >= 2 else np.c_[x, np.zeros(len(x))]
    ratio = list(pca.explained_variance_ratio_) if x.shape[1] >= 2 else [1.0, 0.0]
    fig, ax = plt.subplots(figsize=(7, 6), constrained_layout=True)
    if labels is not None:
        # one scatter in a random order, so that no class is drawn over the others
        import matplotlib.lines as mlines

        palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
        values = sorted(set(labels))
        colour = {v: palette[i % len(palette)] for i, v in enumerate(values)}
        order = np.random.default_rng(0).permutation(len(labels))
        ax.scatter(xy[order, 0], xy[order, 1], s=7, alpha=0.5,
                   c=[colour[labels[i]] for i in order])
        handles = [mlines.Line2D([], [], ls="", marker="o", color=colour[v],
                                 label=f"{(label_names or {}).get(v, f'label {v}')} "
                                       f"({sum(1 for x in labels if x == v)})")
                   for v in values]
        ax.legend(handles=handles, loc="best")
    else:
        points = ax.scatter(xy[:, 0], xy[:, 1], s=7, alpha=0.6, c=lengths, cmap="viridis")
        fig.colorbar(points, ax=ax, label="sentence length (words)")
    ax.set_xlabel(f"PC 1 ({100 * ratio[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC 2 ({100 * ratio[1]:.1f}% of variance)")
    ax.set_title(f"{title}\nposterior means of {len(x)} sentences, PCA")
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _fmt(result: dict, key: str, fmt: str | None, latent_dim: int | None = None) -> str:
    value = result.get(key)
    if key == "nll":
        if value is None:
            return "–"
        return f"{value:.2f} ± {result.get('nll_stderr') or 0:.2f}"
    if key == "au":
        if value is None:
            return "–"
        size = f"/{latent_dim}" if latent_dim else ""
        return f"{value}{size} (δ={result.get('au_delta')})"
    if key == "iw_samples" and value is None and result.get("nll") is not None:
        return "exact"  # a model without latent: -log p(x) needs no importance sampling
    if value is None:
        return "–"
    return fmt.format(value)


def evaluation_table(rows: dict[str, dict], latent_dims: dict[str, int] | None = None) -> str:
    """A markdown table, one row per name, columns :data:`TABLE_FIELDS` (units in the header);
    columns empty in every row are left out."""
    keys = [(k, h, f) for k, h, f in TABLE_FIELDS if any(r.get(k) is not None for r in rows.values())]
    lines = ["| run | " + " | ".join(h for _, h, _ in keys) + " |",
             "|---|" + "---:|" * len(keys)]
    for name, result in rows.items():
        dim = (latent_dims or {}).get(name)
        lines.append(f"| {name} | " + " | ".join(_fmt(result, k, f, dim) for k, _, f in keys) + " |")
    return "\n".join(lines)


def latent_status(kl: float | None, z_gap: float | None, au: int | None, latent_dim: int,
                  kl_threshold: float, gap_threshold: float) -> str:
    """One line saying whether the latent is in use, with the numbers it rests on."""
    if kl is None:
        return "no latent variable (language model)"
    parts = [f"KL {kl:.3f} nats/sentence", f"AU {au}/{latent_dim}"]
    if z_gap is not None:
        parts.append(f"z-usage gap {z_gap:.3f} nats/sentence")
    from textvae.train import collapse_reason

    collapsed = kl < kl_threshold or (z_gap is not None and z_gap < gap_threshold)
    verdict = (f"**collapsed**: {collapse_reason(kl, z_gap, kl_threshold, gap_threshold)}"
               if collapsed else "**in use**: z carries information and reconstructions depend on it")
    return (f"{verdict} ({', '.join(parts)}; thresholds KL {kl_threshold}, "
            f"gap {gap_threshold})")


def _commit(tmp: Path, final: Path) -> None:
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


@torch.no_grad()
def write_report(
    run_dir: str | Path, split: str = "valid", max_sentences: int = 2000, n_examples: int = 5,
    seed: int = 0, label_names: dict[int, str] | None = None, progress: bool = False,
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
        FileNotFoundError: not a run folder; textvae.train.RunDirError: no best checkpoint.
    """
    import textvae
    from textvae.data import LABEL_NAMES, TextDataset, load_split
    from textvae.generate import respond
    from textvae.metrics import active_units, evaluate

    run_dir = Path(run_dir)
    groups = read_log(run_dir)
    model, tokenizer = textvae.load(run_dir)
    cfg = model.config
    corpus = load_split(cfg.data, split)
    texts = corpus.texts[:max_sentences]
    labels = corpus.labels[:max_sentences] if corpus.labels else None
    contexts = corpus.contexts[:max_sentences] if corpus.contexts else None
    if label_names is None:
        label_names = LABEL_NAMES.get(cfg.data.corpus or "")
    dataset = TextDataset(texts, tokenizer, labels, contexts=contexts)

    final = run_dir / "report"
    tmp = final.with_name("report.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    name = run_dir.name
    plot_curves({name: groups}, tmp / "curves.png", f"{name}: training curves", model.has_latent)

    quick = evaluate(model, dataset, iw_samples=0, au_delta=cfg.eval.au_delta,
                     batch_size=cfg.eval.batch_size, seed=seed, progress=progress)
    evaluations = read_evaluations(run_dir)
    latent_dim = math.prod(model.latent_shape) if model.has_latent else None
    t = cfg.train
    status = latent_status(quick["kl"] if model.has_latent else None, quick["z_gap"], quick["au"],
                           latent_dim or 0, t.collapse_kl, t.collapse_z_gap)
    train_steps = max((r.get("step", 0) for g in groups.values() for r in g), default=0)
    warnings = groups.get("warning", [])
    md = [f"# Run report: `{name}`", "",
          f"Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `textvae report`.",
          "", f"**Latent status** (first {len(texts)} sentences of the {split} split, best "
          f"checkpoint): {status}.", ""]
    if warnings:
        md += [f"**Training warned of posterior collapse {len(warnings)} time(s)**, from step "
               f"{warnings[0]['step']} to {warnings[-1]['step']}: {warnings[-1]['message']}", ""]
    m, k = cfg.model, cfg.kl
    if model.backbone == "t5":
        sizes = (f"`{m.pretrained}`" if m.pretrained else
                 f"from scratch (d_model {m.t5_d_model}, {m.t5_num_layers} + "
                 f"{m.t5_num_decoder_layers} layers, {m.t5_num_heads} heads, d_ff {m.t5_d_ff})")
        arch = f"T5 {sizes}, z by {m.latent_injection}, encoder token deletion {m.encoder_token_drop}"
    elif model.backbone == "gpt2":
        sizes = (f"`{m.pretrained}`" if m.pretrained else
                 f"from scratch (n_embd {m.gpt2_n_embd}, {m.gpt2_n_layer} layers, "
                 f"{m.gpt2_n_head} heads)")
        arch = (f"GPT-2 {sizes}, {model.n_latent_layers} latent layers x {m.latent_dim}, fusion "
                f"`{m.fusion}`, KL over layers: {m.kl_reduction}")
    else:
        arch = f"embedding {m.embed_dim}, hidden {m.hidden_dim}"
    md += ["## Setup", "",
           f"- model `{m.name}`: {arch}"
           + (f", latent {m.latent_dim}, pooling `{m.pooling}`, word dropout {m.word_dropout}"
              if model.has_latent else ""),
           *([f"- KL: schedule `{k.schedule}` (beta {k.beta_start} → {k.beta_max} over "
              f"{k.warmup_steps} steps), free bits {k.free_bits} ({k.free_bits_mode})"]
             if model.has_latent else []),
           f"- training: {train_steps} optimizer steps, batch {t.batch_size}, `{t.optimizer}` lr "
           f"{t.lr}, precision {t.precision}; corpus `{cfg.data.corpus or cfg.data.train_path}`",
           f"- tokenizer: {quick['tokenizer']}", ""]
    preferred = {}  # split -> its most complete evaluation (read_evaluations: most complete first)
    for file, e in evaluations.items():
        preferred.setdefault(e.get("split"), file)
    rows = {f"`{file}`" + (" (most complete)" if preferred.get(e.get("split")) == file
                           and len(evaluations) > 1 else ""): e
            for file, e in evaluations.items()}
    rows[f"{split}, first {len(texts)} (this report, no IW)"] = quick
    md += ["## Evaluation", "",
           "Each row names the file its numbers come from (`textvae evaluate` outputs in the run "
           "folder, the most complete of each split first: more sentences, then larger K); the "
           "last row is this report's own single-sample pass. Units: nats per sentence (EOS "
           "counted)" + (f"; MI {quick['mi_estimator']}." if model.has_latent else "."), "",
           evaluation_table(rows, {r: latent_dim for r in rows} if latent_dim else None), ""]
    md += ["## Training curves", "", "![training curves](curves.png)", "",
           "Thin lines: means over `train.log_every` training steps; markers: validations "
           "(single-sample ELBO terms on the validation split).", ""]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model.has_latent:
            q = model.posterior(dataset.collate(list(range(len(dataset)))))
            mu = q.mean.float().flatten(1)  # DELLA's (N, L, D) as (N, L * D), layer-major
            _, var = active_units(mu, cfg.eval.au_delta)
            kl_dims = quick["kl_per_dim"]
            if kl_dims and isinstance(kl_dims[0], list):
                kl_dims = [v for row in kl_dims for v in row]
            plot_kl_per_dim(kl_dims, var.tolist(), cfg.eval.au_delta,
                            tmp / "kl_per_dim.png", name, kl_total=quick["kl"])
            lengths = [len(s.split()) for s in texts]
            plot_projection(mu, tmp / "latent_pca.png", f"{name} ({split} split)", labels,
                            lengths, label_names)
            md += ["## Latent space", "", "![KL per dimension](kl_per_dim.png)", "",
                   "![posterior means, PCA](latent_pca.png)", ""]
        if getattr(model, "conditional", False):
            shown = contexts[:n_examples]
            how = ("three z ~ p(z|c) each, greedy decoding" if model.has_latent
                   else "no latent: three samples each, ancestral sampling")
            answers = respond(model, shown, 3, strategy="greedy" if model.has_latent else "sample")
            md += ["## Examples", "", f"Responses to the first contexts ({how}):", "",
                   "| context | reference | responses |", "|---|---|---|"]
            md += [f"| {c} | {r} | {' / '.join(a or '(empty)' for a in group)} |"
                   for c, r, group in zip(shown, texts, answers, strict=False)]
        else:
            md += _examples(model, texts, n_examples)
    (tmp / "report.md").write_text("\n".join(md) + "\n")
    _commit(tmp, final)
    return final


def _examples(model, texts: list[str], n_examples: int) -> list[str]:
    """Markdown lines: prior samples, and for a latent model reconstructions and one
    interpolation (greedy decoding)."""
    from textvae.generate import interpolate, reconstruct, sample_prior

    md = ["## Examples", "", "Prior samples (z ~ p(z), greedy decoding):", ""]
    md += [f"{i + 1}. {s or '(empty)'}" for i, s in enumerate(
        sample_prior(model, n_examples, strategy="greedy" if model.has_latent else "sample"))]
    if not model.has_latent:
        return md
    inputs = texts[:n_examples]
    outputs = reconstruct(model, inputs, strategy="greedy")
    md += ["", "Reconstructions (greedy from the posterior mean):", "",
           "| input | reconstruction |", "|---|---|"]
    md += [f"| {a} | {b or '(empty)'} |" for a, b in zip(inputs, outputs, strict=True)]
    if len(texts) >= 2:
        a, b = texts[0], texts[min(len(texts) - 1, n_examples)]
        steps = interpolate(model, a, b, steps=5, strategy="greedy")
        md += ["", "Interpolation between two posterior means (linear, 5 points, greedy):",
               "", f"- **from** {a}"]
        md += [f"- {i / 4:.2f}: {s or '(empty)'}" for i, s in enumerate(steps)]
        md += [f"- **to** {b}"]
    return md


def _file_name(path: str | None) -> str | None:
    return None if path is None else Path(path).name


def paired_differences(rows: dict[str, dict]) -> list[str]:
    """Markdown lines: each run's IW-NLL minus the first run's, paired over sentences.

    Two evaluations of the same sentences share most of their variance (long sentences cost
    every model more), so the standard error of the difference of means is that of the
    per-sentence differences d_i = nll_i(run) - nll_i(first), std(d) / sqrt(N), usually far
    smaller than either run's own ``nll_stderr``. Runs are paired only when both JSONs have
    ``nll_per_sentence`` (evaluations before it existed do not) and the same ``data`` file name
    (the folder may be written relative or absolute), ``split``, number of sentences and of
    words; others are listed as not paired.

    Args:
        rows: run name -> evaluation dict (``textvae evaluate``'s JSON), the first the reference.

    Returns:
        Lines for compare.md (empty when fewer than two runs have per-sentence NLLs).
    """
    names = [n for n, r in rows.items() if r.get("nll_per_sentence")]
    if len(names) < 2:
        return []
    ref_name, ref = names[0], rows[names[0]]
    lines = [f"Paired IW-NLL differences against {ref_name} (nats per sentence, mean over the "
             "same sentences ± standard error of the per-sentence differences):", ""]
    base = torch.tensor(ref["nll_per_sentence"], dtype=torch.float64)
    for name in names[1:]:
        r = rows[name]
        same = (_file_name(r.get("data")) == _file_name(ref.get("data"))
                and all(r.get(k) == ref.get(k) for k in ("split", "n_sentences", "n_words")))
        if not same or len(r["nll_per_sentence"]) != len(base):
            lines.append(f"- {name}: not paired (different sentences: data, split or count differ)")
            continue
        d = torch.tensor(r["nll_per_sentence"], dtype=torch.float64) - base
        se = float(d.std(unbiased=True) / math.sqrt(len(d))) if len(d) > 1 else 0.0
        lines.append(f"- {name} - {ref_name}: {float(d.mean()):+.2f} ± {se:.2f} "
                     f"({int((d < 0).sum())} of {len(d)} sentences lower)")
    return lines + [""]


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
        output: folder for ``compare.md`` and ``compare_curves.png`` (created; those two files
            are replaced); None: :func:`default_compare_dir`.

    Returns:
        (markdown text, output folder).

    Raises:
        FileNotFoundError: a folder has no ``log.jsonl``. ValueError: fewer than one run or
            two runs with the same folder name.
    """
    from omegaconf import OmegaConf

    from textvae.models import MODELS

    if not run_dirs:
        raise ValueError("compare needs at least one run folder")
    paths = [Path(r) for r in run_dirs]
    names = [p.name for p in paths]
    if len(set(names)) != len(names):
        raise ValueError(f"two runs share a folder name: {names}")
    rows, dims, logs, missing, files = {}, {}, {}, [], {}
    for path in paths:
        logs[path.name] = read_log(path)
        found = best_evaluation(path, eval_name)
        if found is not None:
            files[path.name], rows[path.name] = found
        else:
            rows[path.name] = {}
            missing.append(path.name)
        cfg = OmegaConf.load(path / "config.yaml")
        cls = MODELS[cfg.model.name]
        # DELLA's L x D latents: L depends on the backbone, so no denominator is shown
        dims[path.name] = cfg.model.latent_dim if cls.has_latent and cls.backbone != "gpt2" else None
    output = Path(output) if output is not None else default_compare_dir(paths)
    output.mkdir(parents=True, exist_ok=True)
    plot_curves(logs, output / "compare_curves.png", "training curves",
                any(MODELS[OmegaConf.load(p / "config.yaml").model.name].has_latent for p in paths))
    notes = ["Evaluations (written by `textvae evaluate`; the most complete of the split "
             f"`{eval_name}` in each run: more sentences, then larger K): "
             + "; ".join(f"{n}: `{f}`" for n, f in files.items())
             + ". Nats per sentence with EOS counted; IW-NLL ± standard error over sentences."]
    tokenizers = {n: r.get("tokenizer") for n, r in rows.items() if r.get("tokenizer")}
    if len(set(tokenizers.values())) > 1:
        notes.append("Tokenizers differ (" + "; ".join(f"{n}: {t}" for n, t in tokenizers.items())
                     + "): compare PPL per word, not per token.")
    if missing:
        notes.append(f"No evaluation of `{eval_name}` in: {', '.join(missing)}.")
    ks = {r["iw_samples"] for r in rows.values() if r.get("iw_samples")}
    if len(ks) > 1:
        notes.append(f"Runs use different IW sample counts {sorted(ks)}: NLLs are not equally tight.")
    paired = paired_differences(rows)
    text = "\n".join(["# Run comparison", "", evaluation_table(rows, dims), "",
                      *[f"- {n}" for n in notes], "", *paired,
                      "![training curves](compare_curves.png)", ""])
    tmp = output / "compare.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, output / "compare.md")
    return text, output
