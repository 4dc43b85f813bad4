"""Run reports and run comparison: is the latent alive, and what does it encode?

:func:`write_report` turns a run folder into ``RUN_DIR/report/`` (``report.md`` plus PNG plots
drawn with matplotlib); :func:`compare_runs` puts several runs' evaluation JSONs side by side
and overlays their training curves. Everything is read from the run folder (``config.yaml``,
``log.jsonl``, ``eval-*.json``, the best checkpoint); nothing in it is changed except the
``report/`` folder, which is rebuilt in a temporary folder and renamed into place.

Units: nats per sentence (EOS counted) unless stated; BLEU 0-100; accuracies in percent.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from textvae import fields
from textvae.atomic import commit_dir, temp_dir
from textvae.rundir import (
    CONFIG,
    best_evaluation,
    collapse_reason,
    read_evaluations,
    read_log,
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "font.size": 10,
            "axes.titlesize": 11,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "figure.dpi": 110,
        }
    )
    return plt


def _field(record: dict, key: str):
    """record[key], following dots into nested dicts (``encoder_dispersion.total_variance``);
    None where missing."""
    for part in key.split("."):
        record = record.get(part) if isinstance(record, dict) else None
    return record


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], _field(r, key)) for r in records if _field(r, key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


CURVES = (  # (log key, title): the panels of a run with a latent, after the likelihood panel
    ("rec", "reconstruction  -log p(x|z)  (nats/sentence)"),
    ("kl", "KL(q(z|x) || p(z))  (nats/sentence)"),
    ("beta", "KL weight beta"),
    ("mi", "mutual information I(x; z)  (nats)"),
    ("au", "active units (dimensions)"),
    ("z_gap", "z-usage gap  (nats/sentence)"),
    # Long et al. 2019's encoder feature dispersion, of the summaries the posterior heads read
    (
        "encoder_dispersion.mean_cosine_distance",
        "encoder dispersion: mean pairwise cosine distance",
    ),
    ("encoder_dispersion.relative_variance", "encoder dispersion: total variance / mean ||h||^2"),
)
TRAIN_WINDOWS = ("likelihood", "rec", "kl", "beta")  # the panels that draw training windows too


def _likelihood_title(latent: list[bool]) -> str:
    """The likelihood panel's title for runs with (True) and without (False) a latent."""
    if all(latent):
        return "likelihood: -ELBO, a bound on -log p(x)  (nats/sentence)"
    if not any(latent):
        return "likelihood: -log p(x), exact  (nats/sentence)"
    return (
        "likelihood: -ELBO (latent runs, a bound) vs exact NLL\n"
        "-log p(x) (language models)  (nats/sentence; lower is better)"
    )


def _likelihood(records: list[dict], latent: bool) -> tuple[list[int], list[float]]:
    """(steps, nats per sentence): -ELBO of a run with a latent (-``elbo`` of a validation,
    ``rec + kl`` of a training window), the exact -log p(x) of one without (its ``rec``)."""
    if not latent:
        return _series(records, "rec")
    pairs = [
        (r["step"], -r["elbo"] if r.get("elbo") is not None else r["rec"] + r["kl"])
        for r in records
        if r.get("elbo") is not None or (r.get("rec") is not None and r.get("kl") is not None)
    ]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _draw_run(axes: dict, label: str, groups: dict, latent: bool, colors: tuple, single: bool):
    """One run's lines into ``axes`` ({log key or "likelihood": Axes}): training windows thin
    in ``colors[0]``, validations with markers in ``colors[1]``; a run without latent only into
    the likelihood panel. ``single``: the labels name the kind of line, not the run."""
    quantity = "-ELBO " if latent else "NLL "
    for key, ax in axes.items():
        if key != "likelihood" and not latent:
            continue  # a language model has no reconstruction term, KL, beta or latent
        name = f"{label} {quantity if key == 'likelihood' else ''}"
        for kind in ("train", "valid"):
            if (kind == "train" and key not in TRAIN_WINDOWS) or (kind, key) == ("valid", "beta"):
                continue
            records = groups.get(kind, [])
            x, y = _likelihood(records, latent) if key == "likelihood" else _series(records, key)
            if not x:
                continue
            if kind == "train":
                faint = 0.45 if key != "beta" else 1.0
                style = dict(
                    color=colors[0], lw=0.8, alpha=faint, marker="." if len(x) < 3 else None
                )
                text = "train (window mean)" if single else f"{name}train"
            else:
                style = dict(color=colors[1], marker="o", ms=4, lw=1.5)
                text = "validation" if single else f"{name}valid" + ("" if latent else " (exact)")
            ax.plot(x, y, label=text, **style)


def plot_curves(
    runs: dict[str, dict[str, list[dict]]],
    path: str | Path,
    title: str,
    has_latent: dict[str, bool],
):
    """Training curves against optimizer step: a likelihood panel (nats/sentence: -ELBO of a
    run with a latent, the exact -log p(x) of a language model, so the two are compared on
    likelihood), then one panel per quantity of :data:`CURVES` when any run has a latent. A run
    without latent is drawn in the likelihood panel only (it has no reconstruction term, KL,
    beta, MI or active units), and the figure's title says so.

    Args:
        runs: ``{label: read_log(run)}``; one run draws training windows (thin) and
            validations (markers) in two colours; several runs one colour each (validations
            with markers, training windows of likelihood, rec, KL and beta thin).
        path: PNG to write.
        title: the figure title.
        has_latent: label -> whether that run's model has a latent (``model.has_latent``).

    Returns:
        The matplotlib Figure, written and closed (its axes, lines and labels can be read).
    """
    plt = _pyplot()
    latent = [has_latent[label] for label in runs]
    panels = [("likelihood", _likelihood_title(latent)), *(CURVES if any(latent) else ())]
    big = len(panels) > 1
    fig, grid = plt.subplots(
        *((3, 3) if big else (1, 1)),
        figsize=(16, 11) if big else (7, 4.5),
        constrained_layout=True,
        squeeze=False,
    )
    axes = {key: ax for (key, _), ax in zip(panels, grid.flat, strict=True)}
    single = len(runs) == 1
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, groups) in enumerate(runs.items()):
        color = colors[i % len(colors)]
        pair = (color, colors[1]) if single else (color, color)
        _draw_run(axes, label, groups, has_latent[label], pair, single)
    for key, text in panels:
        _finish_axes(axes[key], text, key, single)
    without = [label for label, flag in zip(runs, latent, strict=True) if not flag]
    if big and without:
        title += (
            f"\n{', '.join(without)}: no latent variable (language model), drawn in the likelihood "
            "panel only: no reconstruction term, KL, beta, MI or active units"
        )
    fig.suptitle(title)
    fig.savefig(path)
    plt.close(fig)
    return fig


def _finish_axes(ax, title: str, key: str, single: bool) -> None:
    """Title, x label and legend of one panel; a note where no run logged its quantity."""
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    if ax.get_lines():
        if key == "au":
            ax.set_ylim(bottom=0)  # a count: start at 0, so a flat 32 does not look like noise
        ax.legend(fontsize=8, loc="best")
        return
    ax.text(
        0.5,
        0.5,
        "not logged by this run" if single else "not logged by these runs",
        ha="center",
        va="center",
        transform=ax.transAxes,
        color="gray",
    )


PER_DIMENSION_FLOORS = ("per_dim", "per_sentence_dim")  # free-bits modes that floor each dimension


def plot_kl_per_dim(
    kl_dims: list[float] | None,
    mu_var: list[float],
    delta: float,
    path: str | Path,
    title: str,
    free_bits: float = 0.0,
    free_bits_mode: str = "per_dim",
    kl_total: float | None = None,
):
    """Two aligned bar charts over latent dimensions: KL per dimension (nats/sentence, linear,
    with the free-bits floor) and Var_x(E_q[z|x]) (log) with the active-unit threshold delta as
    a line; active dimensions are coloured in both panels. ``kl_dims`` None (a flow posterior or
    prior has no per-dimension KL) draws the variance panel only, with ``kl_total`` (Monte
    Carlo) in the title.

    Args:
        free_bits: the run's ``kl.free_bits`` lambda, nats (0: off). In a per-dimension mode
            (``per_dim``, ``per_sentence_dim``) it is a horizontal line on the KL panel; a floor
            on the total KL or on each layer's KL is named in the title.
        free_bits_mode: the run's ``kl.free_bits_mode``.

    Returns:
        The matplotlib Figure, written and closed (its axes and lines can be read).
    """
    plt = _pyplot()
    d = len(mu_var)
    active = [v > delta for v in mu_var]
    colors = ["#d62728" if a else "#7f7f7f" for a in active]
    width = max(7.0, 0.28 * d + 2)
    if kl_dims is not None:
        fig, (top, bottom) = plt.subplots(
            2, 1, figsize=(width, 6.5), sharex=True, constrained_layout=True
        )
        _kl_panel(top, kl_dims, colors, free_bits, free_bits_mode)
        heading, kl_text = top, f"KL total {sum(kl_dims):.3f} nats"
    else:
        fig, bottom = plt.subplots(figsize=(width, 3.8), constrained_layout=True)
        heading = bottom
        kl_text = "no per-dimension KL (flow): Monte Carlo KL total " + (
            f"{kl_total:.3f} nats" if kl_total is not None else "n/a"
        )
    floor = _free_bits_text(free_bits, free_bits_mode, d, drawn=kl_dims is not None)
    heading.set_title(
        f"{title}\n{kl_text}{floor}\n{sum(active)}/{d} active units (red) at delta = {delta}"
    )
    _variance_panel(bottom, mu_var, colors, delta)
    step = 1 if d <= 40 else max(1, d // 32)
    bottom.set_xticks(range(0, d, step))
    fig.savefig(path)
    plt.close(fig)
    return fig


def _free_bits_text(free_bits: float, mode: str, d: int, drawn: bool) -> str:
    """The title's words on a free-bits floor that the KL panel does not draw as a line."""
    if free_bits <= 0 or (drawn and mode in PER_DIMENSION_FLOORS):
        return ""
    if mode == "total":
        return f"; free bits {free_bits} nats on the total KL"
    if mode == "per_layer":
        return f"; free bits {free_bits} nats on each layer's KL"
    # no per-dimension KL: the objective floors the total at d * lambda
    return f"; free bits {free_bits} nats per dimension ({free_bits * d:g} on the total)"


def _kl_panel(ax, kl_dims: list[float], colors: list[str], free_bits: float, mode: str) -> None:
    """KL per dimension (nats/sentence) as bars, with the free-bits floor as a line.

    A linear axis, not a log one: nats add up, so the bars sum to the KL total and the axis is
    spent on the dimensions that carry information (a log axis spends most of its height on
    the 1e-5..1e-2 nats of collapsed dimensions, which are ~0 on any scale that matters for the
    bound). How far below the threshold a dimension lies is the variance panel's job (log).
    """
    ax.bar(range(len(kl_dims)), kl_dims, color=colors)
    floor = free_bits > 0 and mode in PER_DIMENSION_FLOORS
    ax.set_ylim(0, max([*kl_dims, free_bits if floor else 0.0, 1e-3]) * 1.15)
    if floor:
        each = "per dimension" + (" and sentence" if mode == "per_sentence_dim" else "")
        ax.axhline(
            free_bits,
            color="black",
            ls=":",
            lw=1.4,
            label=f"free bits floor lambda = {free_bits} nats {each} ({mode})",
        )
        ax.legend(loc="best", fontsize=8, framealpha=1.0)
    ax.set_ylabel("KL per dimension\n(nats/sentence)")


def _variance_panel(ax, mu_var: list[float], colors: list[str], delta: float) -> None:
    """Var over sentences of the posterior mean per dimension as bars on a log axis, with the
    AU threshold delta. The axis starts at half the smallest positive variance, kept between
    delta / 1000 and delta / 10 (the threshold never at the bottom edge, at most three decades
    below it); smaller values are drawn at the limit."""
    scale = delta if delta > 0 else 1e-2
    positive = [v for v in mu_var if v > 0]
    low = min(max(min(positive, default=scale) / 2, scale * 1e-3), scale / 10)
    ax.bar(range(len(mu_var)), [max(v, low) for v in mu_var], color=colors)
    ax.axhline(delta, color="black", ls="--", lw=1.2, label=f"AU threshold delta = {delta}")
    ax.set_yscale("log")
    ax.set_ylim(low, max([*mu_var, delta]) * 3)  # room above the threshold line for its label
    ax.set_ylabel("Var over sentences of\nposterior mean (log)")
    ax.set_xlabel("latent dimension")
    ax.legend(loc="best", fontsize=8, framealpha=1.0)


def plot_projection(
    mu: torch.Tensor,
    path: str | Path,
    title: str,
    labels: list[int] | None = None,
    lengths: list[int] | None = None,
    label_names: dict[int, str] | None = None,
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
        ax.scatter(xy[order, 0], xy[order, 1], s=7, alpha=0.5, c=[colour[labels[i]] for i in order])
        handles = [
            mlines.Line2D(
                [],
                [],
                ls="",
                marker="o",
                color=colour[v],
                label=f"{(label_names or {}).get(v, f'label {v}')} "
                f"({sum(1 for x in labels if x == v)})",
            )
            for v in values
        ]
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


def plot_rate_distortion(rows: dict[str, dict], path: str | Path, title: str) -> dict:
    """The rate-distortion plane of Alemi et al. 2018 ("Fixing a Broken ELBO", Fig. 1).

    Each run with a latent is a point at rate R = ``kl`` (x) and distortion D = ``rec`` (y),
    both nats per sentence (EOS counted), labelled with its IW-NLL, MI (nats) and AU. Dashed
    grey lines are R + D = c, the runs of equal ELBO (-ELBO = R + D); points further down-left
    have a better bound. A run without latent (a language model: ``kl`` is None and ``nll`` is
    its exact -log p(x)) is drawn at R = 0, D = NLL, with its line R + D = NLL (dash-dot): a VAE
    below that line has an ELBO better than the LM's exact NLL. Runs without ``kl``/``rec`` and
    without ``nll`` are left out.

    Args:
        rows: run name -> evaluation dict (``textvae evaluate``'s JSON).
        path: PNG to write.
        title: the figure title.

    Returns:
        ``{"points": [{"name", "rate", "distortion", "nll", "mi", "au"}, ...], "lm": [{"name",
        "nll"}, ...], "elbo_lines": [c, ...]}``: what was drawn, in nats per sentence.
    """
    points = [
        {
            "name": n,
            "rate": r["kl"],
            "distortion": r["rec"],
            "nll": r.get("nll"),
            "mi": r.get("mi"),
            "au": r.get("au"),
        }
        for n, r in rows.items()
        if r.get("kl") is not None and r.get("rec") is not None
    ]
    lms = [
        {"name": n, "nll": r["nll"]}
        for n, r in rows.items()
        if r.get("kl") is None and r.get("nll") is not None
    ]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 6.5), constrained_layout=True)
    totals = [p["rate"] + p["distortion"] for p in points] + [m["nll"] for m in lms]
    rates = [p["rate"] for p in points] + [0.0]
    dists = [p["distortion"] for p in points] + [m["nll"] for m in lms]
    elbo_lines: list[float] = []
    if totals:
        x_hi = max(rates) * 1.3 + 0.5  # room for the labels right of the points
        y_lo, y_hi = min(dists), max(dists)
        pad = max(0.5, 0.08 * (y_hi - y_lo + x_hi))
        ax.set_xlim(-0.03 * x_hi - 0.05, x_hi)
        ax.set_ylim(y_lo - pad, y_hi + pad)
        # about eight lines across the visible range of R + D
        lo, hi = y_lo - pad, y_hi + pad + x_hi
        step = _nice_step((hi - lo) / 8)
        c = math.floor(lo / step) * step
        while c <= hi:
            elbo_lines.append(round(c, 6))
            c += step
        xs = [0.0, x_hi]
        for c in elbo_lines:
            ax.plot(xs, [c - x for x in xs], ls="--", lw=0.8, color="0.65", zorder=1)
            x_text = c - (y_lo - pad)  # where the line meets the bottom of the axes
            if 0 < x_text < x_hi * 0.97:
                ax.text(
                    x_text, y_lo - pad, f" {c:g}", fontsize=7, color="0.45", ha="left", va="bottom"
                )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ax.plot(
        [],
        [],
        ls="--",
        lw=0.8,
        color="0.65",
        label="R + D = const (equal ELBO; its value at the bottom)",
    )
    for m in lms:
        x_end = ax.get_xlim()[1]
        ax.plot(
            [0.0, x_end],
            [m["nll"], m["nll"] - x_end],
            ls="-.",
            lw=1.3,
            color="black",
            zorder=2,
            label=f"{m['name']}: LM, exact NLL {m['nll']:.2f} (R = 0, D = NLL)",
        )
        ax.plot([0.0], [m["nll"]], marker="s", color="black", ms=7, zorder=4)
    fig.canvas.draw()  # fixes the axes' transform for the label placement below
    placed: list[tuple[float, float, float, float]] = []  # label boxes in pixels
    px = fig.dpi / 72.0  # pixels per point
    for i, p in enumerate(sorted(points, key=lambda p: (p["distortion"], p["rate"]))):
        ax.scatter(
            [p["rate"]],
            [p["distortion"]],
            s=45,
            color=colors[i % len(colors)],
            zorder=5,
            edgecolor="black",
            linewidth=0.5,
        )
        nll = "–" if p["nll"] is None else f"{p['nll']:.2f}"
        mi = "–" if p["mi"] is None else f"{p['mi']:.2f}"
        au = "–" if p["au"] is None else str(p["au"])
        text = f"{p['name']}\nIW-NLL {nll}, MI {mi}, AU {au}"
        # greedy placement: move the label up until it clears the labels already placed
        x0, y0 = ax.transData.transform((p["rate"], p["distortion"]))
        w = 7 * 0.6 * px * max(len(line) for line in text.split("\n"))
        h = 2 * 8.5 * px
        dy = 4 * px
        while any(
            x0 + 6 * px < b[2] and b[0] < x0 + 6 * px + w and y0 + dy < b[3] and b[1] < y0 + dy + h
            for b in placed
        ):
            dy += 3 * px
        placed.append((x0 + 6 * px, y0 + dy, x0 + 6 * px + w, y0 + dy + h))
        ax.annotate(
            text,
            (p["rate"], p["distortion"]),
            textcoords="offset pixels",
            xytext=(6 * px, dy),
            fontsize=7,
            color=colors[i % len(colors)],
            arrowprops=dict(arrowstyle="-", lw=0.5, color="0.5") if dy > 12 * px else None,
        )
    ax.set_xlabel("rate R = KL(q(z|x) || p(z))  (nats/sentence)")
    ax.set_ylabel("distortion D = E_q[-log p(x|z)]  (nats/sentence)")
    ax.set_title(f"{title}\nlabels: IW-NLL (nats/sentence), MI (nats), active units", fontsize=10)
    if points or lms:
        ax.legend(fontsize=8, loc="upper right")
    else:
        ax.text(
            0.5,
            0.5,
            "no run with an evaluation (kl, rec or nll)",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="gray",
        )
    fig.savefig(path)
    plt.close(fig)
    return {"points": points, "lm": lms, "elbo_lines": elbo_lines}


def _nice_step(raw: float) -> float:
    """1, 2 or 5 times a power of ten, at least ``raw``."""
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def format_value(result: dict, key: str, latent_dim: int | None = None) -> str:
    """The table cell of field ``key`` of an evaluation ``result``: its
    :data:`textvae.fields.EVAL_FIELDS` format; ``nll`` with its standard error, ``au`` with the
    latent size (``latent_dim``, when given) and its threshold, ``iw_samples`` "exact" for a
    model without latent; "–" for a missing value and for the ``rec`` of a model without latent
    (its ``rec`` is its -log p(x): it has no reconstruction term to set beside a VAE's)."""
    value = result.get(key)
    if key == "rec" and _exact_nll(result):
        return "–"
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
    return fields.field(key).format.format(value)


def _exact_nll(result: dict) -> bool:
    """Whether an evaluation's ``nll`` is exact: a model without latent (no KL, no K)."""
    return (
        result.get("nll") is not None and result.get("kl") is None and not result.get("iw_samples")
    )


def _nll_header(rows: dict[str, dict]) -> str:
    """The NLL column's header: IW-NLL, or exact where every row is exact, or both."""
    exact = [_exact_nll(r) for r in rows.values() if r.get("nll") is not None]
    if exact and all(exact):
        return "NLL (nats/sent, exact)"
    if any(exact):
        return "NLL (nats/sent; IW bound, exact for an LM)"
    return fields.field("nll").column


def evaluation_table(rows: dict[str, dict], latent_dims: dict[str, int] | None = None) -> str:
    """A markdown table, one row per name, one column per field of
    :data:`textvae.fields.TABLE_COLUMNS` (its ``column`` header, units included; its
    ``format``; the NLL's header says whether it is an IW bound or exact, :func:`_nll_header`);
    columns empty in every row are left out."""
    columns = [
        f
        for f in fields.table_fields()
        if any(r.get(f.name) is not None and format_value(r, f.name) != "–" for r in rows.values())
    ]
    headers = [_nll_header(rows) if f.name == "nll" else f.column for f in columns]
    lines = [
        "| run | " + " | ".join(headers) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, result in rows.items():
        dim = (latent_dims or {}).get(name)
        lines.append(
            f"| {name} | " + " | ".join(format_value(result, f.name, dim) for f in columns) + " |"
        )
    return "\n".join(lines)


def latent_status(
    kl: float | None,
    z_gap: float | None,
    au: int | None,
    latent_dim: int,
    kl_threshold: float,
    gap_threshold: float,
) -> str:
    """One line saying whether the latent is in use, with the numbers it rests on."""
    if kl is None:
        return "no latent variable (language model)"
    parts = [f"KL {kl:.3f} nats/sentence", f"AU {au}/{latent_dim}"]
    if z_gap is not None:
        parts.append(f"z-usage gap {z_gap:.3f} nats/sentence")
    collapsed = kl < kl_threshold or (z_gap is not None and z_gap < gap_threshold)
    verdict = (
        f"**collapsed**: {collapse_reason(kl, z_gap, kl_threshold, gap_threshold)}"
        if collapsed
        else "**in use**: z carries information and reconstructions depend on it"
    )
    return f"{verdict} ({', '.join(parts)}; thresholds KL {kl_threshold}, gap {gap_threshold})"


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
    from textvae.data import TextDataset, load_split
    from textvae.data import label_names as corpus_label_names
    from textvae.generate import respond
    from textvae.metrics import active_units, evaluate

    run_dir = Path(run_dir)
    groups = read_log(run_dir)
    model, tokenizer = textvae.load(run_dir)
    cfg = model.config
    corpus = load_split(cfg.data, split, whole=True)
    texts = corpus.texts[:max_sentences]
    labels = corpus.labels[:max_sentences] if corpus.labels else None
    contexts = corpus.contexts[:max_sentences] if corpus.contexts else None
    if label_names is None:
        label_names = corpus_label_names(cfg.data.corpus)
    dataset = TextDataset(texts, tokenizer, labels, contexts=contexts)

    final = run_dir / "report"
    tmp = temp_dir(final)
    tmp.mkdir()
    name = run_dir.name
    plot_curves(
        {name: groups}, tmp / "curves.png", f"{name}: training curves", {name: model.has_latent}
    )

    quick = evaluate(
        model,
        dataset,
        iw_samples=0,
        au_delta=cfg.eval.au_delta,
        batch_size=cfg.eval.batch_size,
        seed=seed,
        skip_too_long=True,
        progress=progress,
    )
    evaluations = read_evaluations(run_dir)
    latent_dim = math.prod(model.latent_shape) if model.has_latent else None
    t = cfg.train
    status = latent_status(
        quick["kl"] if model.has_latent else None,
        quick["z_gap"],
        quick["au"],
        latent_dim or 0,
        t.collapse_kl,
        t.collapse_z_gap,
    )
    train_steps = max((r.get("step", 0) for g in groups.values() for r in g), default=0)
    warnings = groups.get("warning", [])
    md = [
        f"# Run report: `{name}`",
        "",
        f"Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `textvae report`.",
        "",
        f"**Latent status** (first {len(texts)} sentences of the {split} split, best "
        f"checkpoint): {status}.",
        "",
    ]
    if warnings:
        md += [
            f"**Training warned of posterior collapse {len(warnings)} time(s)**, from step "
            f"{warnings[0]['step']} to {warnings[-1]['step']}: {warnings[-1]['message']}",
            "",
        ]
    m, k = cfg.model, cfg.kl
    if model.backbone == "t5":
        sizes = (
            f"`{m.pretrained}`"
            if m.pretrained
            else f"from scratch (d_model {m.t5_d_model}, {m.t5_num_layers} + "
            f"{m.t5_num_decoder_layers} layers, {m.t5_num_heads} heads, d_ff {m.t5_d_ff})"
        )
        arch = (
            f"T5 {sizes}, z by {m.latent_injection}, encoder token deletion {m.encoder_token_drop}"
        )
    elif model.backbone == "gpt2":
        sizes = (
            f"`{m.pretrained}`"
            if m.pretrained
            else f"from scratch (n_embd {m.gpt2_n_embd}, {m.gpt2_n_layer} layers, "
            f"{m.gpt2_n_head} heads)"
        )
        arch = (
            f"GPT-2 {sizes}, {model.n_latent_layers} latent layers x {m.latent_dim}, fusion "
            f"`{m.fusion}`, KL over layers: {m.kl_reduction}"
        )
    else:
        arch = f"embedding {m.embed_dim}, hidden {m.hidden_dim}"
    md += [
        "## Setup",
        "",
        f"- model `{m.name}`: {arch}"
        + (
            f", latent {m.latent_dim}, pooling `{m.pooling}`"
            + (f", word dropout {m.word_dropout}" if hasattr(m, "word_dropout") else "")
            if model.has_latent
            else ""
        ),
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
    how = "no IW" if model.has_latent else "exact NLL"
    rows[f"{split}, first {len(texts)} (this report, {how})"] = quick
    md += [
        "## Evaluation",
        "",
        "Each row names the file its numbers come from (`textvae evaluate` outputs in the run "
        "folder, the most complete of each split first: more sentences, then larger K); the "
        f"last row is this report's own {'single-sample' if model.has_latent else 'exact'} "
        "pass. Units: nats per sentence (EOS "
        "counted)" + (f"; MI {quick['mi_estimator']}." if model.has_latent else "."),
        "",
        evaluation_table(rows, {r: latent_dim for r in rows} if latent_dim else None),
        "",
    ]
    disp = quick.get("encoder_dispersion") or {}
    if disp.get("total_variance") is not None:
        md += [
            f"Encoder feature dispersion (Long et al. 2019; the {disp['dim']}-dimensional "
            f"summaries the posterior heads read, over the {disp['n']} sentences above): mean "
            f"pairwise cosine distance {disp['mean_cosine_distance']:.4f}, total variance "
            f"{disp['total_variance']:.4g} ({disp['relative_variance']:.4f} of the mean "
            "squared norm); the curves below follow it over training.",
            "",
        ]
    elif disp.get("reason"):
        md += [f"Encoder feature dispersion: not measured ({disp['reason']}).", ""]
    md += [
        "## Training curves",
        "",
        "![training curves](curves.png)",
        "",
        "Thin lines: means over `train.log_every` training steps; markers: validations "
        + (
            "(single-sample ELBO terms on the validation split)."
            if model.has_latent
            else "(the exact -log p(x) on the validation split; a language model has no "
            "latent, so no KL to draw)."
        ),
        "",
    ]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model.has_latent:
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
                tmp / "kl_per_dim.png",
                name,
                cfg.kl.free_bits,
                cfg.kl.free_bits_mode,
                kl_total=quick["kl"],
            )
            lengths = [len(s.split()) for s in texts]
            plot_projection(
                mu, tmp / "latent_pca.png", f"{name} ({split} split)", labels, lengths, label_names
            )
            md += [
                "## Latent space",
                "",
                "![KL per dimension](kl_per_dim.png)",
                "",
                "![posterior means, PCA](latent_pca.png)",
                "",
            ]
        if getattr(model, "conditional", False):
            shown = contexts[:n_examples]
            how = (
                "three z ~ p(z|c) each, greedy decoding"
                if model.has_latent
                else "no latent: three samples each, ancestral sampling"
            )
            answers = respond(model, shown, 3, strategy="greedy" if model.has_latent else "sample")
            md += [
                "## Examples",
                "",
                f"Responses to the first contexts ({how}):",
                "",
                "| context | reference | responses |",
                "|---|---|---|",
            ]
            md += [
                f"| {c} | {r} | {' / '.join(a or '(empty)' for a in group)} |"
                for c, r, group in zip(shown, texts, answers, strict=False)
            ]
        else:
            md += _examples(model, texts, n_examples)
    (tmp / "report.md").write_text("\n".join(md) + "\n")
    commit_dir(tmp, final)
    return final


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


def _file_name(path: str | None) -> str | None:
    return None if path is None else Path(path).name


def _in_index_order(r: dict, n_words: list[int]) -> list[float]:
    """The per-sentence NLLs of an evaluation written before ``sentence_index`` existed (in the
    evaluation batches' order: sentences stably sorted by token count), put back in dataset
    order. Only for a word-level tokenizer, whose token count is the word count + 1 (EOS), so
    the order is that of ``n_words`` (the other evaluation's ``n_words_per_sentence``).

    Raises:
        ValueError: the tokenizer is not word-level (its order cannot be recovered).
    """
    if not str(r.get("tokenizer", "")).startswith("WordLevel"):
        raise ValueError(
            f"its nll_per_sentence has no sentence_index and is in the order of its "
            f"{r.get('tokenizer') or 'unknown'} token counts, which cannot be put back "
            "in dataset order; re-run textvae evaluate"
        )
    order = sorted(range(len(n_words)), key=lambda i: n_words[i])
    out = [0.0] * len(order)
    for value, i in zip(r["nll_per_sentence"], order, strict=True):
        out[i] = value
    return out


def paired_nll(ref: dict, other: dict) -> torch.Tensor:
    """Per-sentence IW-NLL differences d_i = nll_i(other) - nll_i(ref) on the same sentences,
    paired by sentence index: (N,) float64, nats per sentence, in dataset order.

    Both evaluations must have scored the same sentences: the same ``data`` file name (the
    folder may be written relative or absolute) and ``split``, the same ``sentence_index`` and
    the same ``n_words_per_sentence``. An evaluation written before ``sentence_index`` existed
    holds its values in length-sorted order; it is paired only when its tokenizer is
    word-level (the order is then that of the word counts, recovered exactly; two such old
    evaluations pair position by position), never for subword tokenizers.

    Raises:
        ValueError: the reason the two cannot be paired (missing values, different file, split,
            sentences or word counts, or an old subword evaluation).
    """
    for name, r in (("reference", ref), ("other", other)):
        if not r.get("nll_per_sentence"):
            raise ValueError(f"the {name} evaluation has no nll_per_sentence")
    if _file_name(ref.get("data")) != _file_name(other.get("data")) or ref.get(
        "split"
    ) != other.get("split"):
        raise ValueError(
            f"different data: {_file_name(other.get('data'))} ({other.get('split')}) vs "
            f"{_file_name(ref.get('data'))} ({ref.get('split')})"
        )
    new = [r.get("sentence_index") is not None for r in (ref, other)]
    if not any(new):  # two old evaluations: both must be word-level (same length order)
        if ref.get("n_sentences") != other.get("n_sentences") or ref.get("n_words") != other.get(
            "n_words"
        ):
            raise ValueError("different sentences (count or words differ)")
        for r in (ref, other):
            if not str(r.get("tokenizer", "")).startswith("WordLevel"):
                raise ValueError(
                    f"an evaluation without sentence_index ({r.get('tokenizer')}) is in "
                    "the order of its subword token counts; re-run textvae evaluate"
                )
        a, b = ref["nll_per_sentence"], other["nll_per_sentence"]
    else:
        full = ref if new[0] else other
        index, words = full["sentence_index"], full["n_words_per_sentence"]
        vals = {}
        for key, r in (("ref", ref), ("other", other)):
            if r.get("sentence_index") is None:
                if index != list(range(len(index))) or r.get("n_sentences") != len(index):
                    raise ValueError(
                        "an evaluation without sentence_index can only be paired with "
                        "one of every sentence 0..N-1 of the same N"
                    )
                if r.get("n_words") != sum(words):
                    raise ValueError("different sentences (word totals differ)")
                vals[key] = _in_index_order(r, words)
                continue
            if r["sentence_index"] != index:
                diff = set(r["sentence_index"]) ^ set(index)
                raise ValueError(
                    f"different sentences: {len(diff)} indices scored by one only "
                    f"(e.g. {min(diff)})"
                    if diff
                    else "sentence_index out of order"
                )
            if r["n_words_per_sentence"] != words:
                k = next(
                    i
                    for i, (x, y) in enumerate(zip(r["n_words_per_sentence"], words, strict=True))
                    if x != y
                )
                raise ValueError(
                    f"the same indices hold different sentences (sentence "
                    f"{index[k]}: {r['n_words_per_sentence'][k]} vs {words[k]} words)"
                )
            vals[key] = r["nll_per_sentence"]
        a, b = vals["ref"], vals["other"]
    if len(a) != len(b):
        raise ValueError(f"different numbers of sentences ({len(b)} vs {len(a)})")
    return torch.tensor(b, dtype=torch.float64) - torch.tensor(a, dtype=torch.float64)


def paired_differences(rows: dict[str, dict]) -> list[str]:
    """Markdown lines: each run's IW-NLL minus the first run's, paired over sentences.

    Two evaluations of the same sentences share most of their variance (long sentences cost
    every model more), so the standard error of the difference of means is that of the
    per-sentence differences d_i = nll_i(run) - nll_i(first), std(d) / sqrt(N), usually far
    smaller than either run's own ``nll_stderr``. Sentences are paired by index
    (:func:`paired_nll`); a run whose evaluation did not score the same sentences is listed as
    not paired, with the reason.

    Args:
        rows: run name -> evaluation dict (``textvae evaluate``'s JSON), the first the reference.

    Returns:
        Lines for compare.md (empty when fewer than two runs have per-sentence NLLs).
    """
    names = [n for n, r in rows.items() if r.get("nll_per_sentence")]
    if len(names) < 2:
        return []
    ref_name, ref = names[0], rows[names[0]]
    lines = [
        f"Paired IW-NLL differences against {ref_name} (nats per sentence, mean over the "
        "same sentences paired by index ± standard error of the per-sentence differences):",
        "",
    ]
    for name in names[1:]:
        try:
            d = paired_nll(ref, rows[name])
        except ValueError as err:
            lines.append(f"- {name}: not paired ({err})")
            continue
        se = float(d.std(unbiased=True) / math.sqrt(len(d))) if len(d) > 1 else 0.0
        lines.append(
            f"- {name} - {ref_name}: {float(d.mean()):+.2f} ± {se:.2f} "
            f"({int((d < 0).sum())} of {len(d)} sentences lower)"
        )
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
        output: folder for ``compare.md``, ``compare_curves.png`` and ``rate_distortion.png``
            (:func:`plot_rate_distortion`; created; those files are replaced); None:
            :func:`default_compare_dir`.

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
    rows, dims, logs, missing, files, latent = {}, {}, {}, [], {}, {}
    for path in paths:
        logs[path.name] = read_log(path)
        found = best_evaluation(path, eval_name)
        if found is not None:
            files[path.name], rows[path.name] = found
        else:
            rows[path.name] = {}
            missing.append(path.name)
        cfg = OmegaConf.load(path / CONFIG)
        cls = MODELS[cfg.model.name]
        latent[path.name] = cls.has_latent
        # DELLA's L x D latents: L depends on the backbone, so no denominator is shown
        dims[path.name] = (
            cfg.model.latent_dim if cls.has_latent and cls.backbone != "gpt2" else None
        )
    output = Path(output) if output is not None else default_compare_dir(paths)
    output.mkdir(parents=True, exist_ok=True)
    plot_curves(logs, output / "compare_curves.png", "training curves", latent)
    plot_rate_distortion(rows, output / "rate_distortion.png", f"rate-distortion ({eval_name})")
    notes = [
        "Evaluations (written by `textvae evaluate`; the most complete of the split "
        f"`{eval_name}` in each run: more sentences, then larger K): "
        + "; ".join(f"{n}: `{f}`" for n, f in files.items())
        + ". Nats per sentence with EOS counted; IW-NLL ± standard error over sentences"
        + (
            " (exact NLL for a language model, which has no latent)."
            if any(_exact_nll(r) for r in rows.values())
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
    paired = paired_differences(rows)
    text = "\n".join(
        [
            "# Run comparison",
            "",
            evaluation_table(rows, dims),
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
