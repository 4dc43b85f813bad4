"""The report's figures: training curves, KL per dimension, the posterior means' PCA and the
rate-distortion plane, each drawn with matplotlib into a PNG and returned for inspection.

Units: nats per sentence (EOS counted) unless stated.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


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
    ``rec + kl`` of a training window), the exact -log p(x) of one without (its ``rec``).

    A run's autoencoder phase (records with ``phase`` "ae", KL weight 0) is left out: its
    -ELBO is a valid bound but the KL it does not pay grows to hundreds of nats, which would
    set the panel's scale and flatten every other line (its rec and KL stay in their panels)."""
    if not latent:
        return _series(records, "rec")
    pairs = [
        (r["step"], -r["elbo"] if r.get("elbo") is not None else r["rec"] + r["kl"])
        for r in records
        if r.get("phase") != "ae"
        and (r.get("elbo") is not None or (r.get("rec") is not None and r.get("kl") is not None))
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
            ax.plot(x, y, label=text, gid=kind, **style)


def _clip_to_validations(ax) -> None:
    """Scale the likelihood panel ``ax`` (nats/sentence; its lines tagged by ``gid`` "train" or
    "valid", as :func:`_draw_run` draws them) to its validations, clipping training windows
    above them.

    The first training windows of a VAE phase (a decoder just reset, beta near 0) pay KLs of
    hundreds of nats; drawn in full, they set the panel's scale and flatten the validation lines
    that the panel exists to compare. The panel's top is set just above its highest validation
    point or the 98th percentile of its training windows, whichever is higher, and the x label
    says how many windows lie above it; nothing is dropped from the data, and a panel with no
    window above that top is left as it is."""
    valid = [y for line in ax.get_lines() if line.get_gid() == "valid" for y in line.get_ydata()]
    train = [y for line in ax.get_lines() if line.get_gid() == "train" for y in line.get_ydata()]
    if not valid or not train:
        return
    low = min(min(valid), min(train))
    high = max(max(valid), float(np.quantile(train, 0.98, method="lower")))
    above = sum(y > high for y in train)
    if not above:
        return
    ax.set_ylim(low - 0.05 * (high - low or 1.0), high + 0.1 * (high - low or 1.0))
    windows = f"{above} training window{'s' if above > 1 else ''}"
    ax.set_xlabel(f"optimizer step\n({windows} above the top, up to {max(train):.0f}, clipped)")


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
    _clip_to_validations(axes["likelihood"])
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
    points, lms = _rate_distortion_rows(rows)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 6.5), constrained_layout=True)
    elbo_lines = _elbo_lines(ax, points, lms)
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
        _draw_language_model(ax, m)
    fig.canvas.draw()  # fixes the axes' transform for the label placement below
    _draw_points(fig, ax, points, colors)
    ax.set_xlabel("rate R = KL(q(z|x) || p(z))  (nats/sentence)")
    ax.set_ylabel("distortion D = E_q[-log p(x|z)]  (nats/sentence)")
    ax.set_title(f"{title}\nlabels: IW-NLL (nats/sentence), MI (nats), active units", fontsize=10)
    _legend_or_note(ax, bool(points or lms))
    fig.savefig(path)
    plt.close(fig)
    return {"points": points, "lm": lms, "elbo_lines": elbo_lines}


def _rate_distortion_rows(rows: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    """The runs with a latent as points ``{"name", "rate", "distortion", "nll", "mi", "au"}``
    and the runs without (``kl`` None, an ``nll``) as ``{"name", "nll"}``."""
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
    return points, lms


def _legend_or_note(ax, drawn: bool) -> None:
    """The legend where runs were drawn, else a note that no run had an evaluation."""
    if drawn:
        ax.legend(fontsize=8, loc="upper right")
        return
    ax.text(
        0.5,
        0.5,
        "no run with an evaluation (kl, rec or nll)",
        ha="center",
        va="center",
        transform=ax.transAxes,
        color="gray",
    )


def _elbo_lines(ax, points: list[dict], lms: list[dict]) -> list[float]:
    """Set the axes' limits around the points and the LMs' (0, NLL), and draw about eight lines
    R + D = c across them (dashed grey, each labelled with c where it meets the bottom).
    Returns the c drawn (nats/sentence); none without points or LMs."""
    totals = [p["rate"] + p["distortion"] for p in points] + [m["nll"] for m in lms]
    rates = [p["rate"] for p in points] + [0.0]
    dists = [p["distortion"] for p in points] + [m["nll"] for m in lms]
    elbo_lines: list[float] = []
    if not totals:
        return elbo_lines
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
            ax.text(x_text, y_lo - pad, f" {c:g}", fontsize=7, color="0.45", ha="left", va="bottom")
    return elbo_lines


def _draw_language_model(ax, m: dict) -> None:
    """A language model's line R + D = NLL (dash-dot, in the legend) and its point (0, NLL)."""
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


def _draw_points(fig, ax, points: list[dict], colors: list[str]) -> None:
    """The runs with a latent as points, each labelled with its IW-NLL, MI and AU; a label is
    moved up until it clears those already placed (greedy, in pixels; an arrow where moved)."""
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
        x0, y0 = ax.transData.transform((p["rate"], p["distortion"]))
        dy = _free_height(placed, text, x0 + 6 * px, y0, px)
        ax.annotate(
            text,
            (p["rate"], p["distortion"]),
            textcoords="offset pixels",
            xytext=(6 * px, dy),
            fontsize=7,
            color=colors[i % len(colors)],
            arrowprops=dict(arrowstyle="-", lw=0.5, color="0.5") if dy > 12 * px else None,
        )


def _free_height(placed: list, text: str, x: float, y0: float, px: float) -> float:
    """The offset dy (pixels) above y0 at which the box of ``text`` (7-point font) starting at
    x overlaps none of the boxes ``placed``; appends its box to ``placed``."""
    w = 7 * 0.6 * px * max(len(line) for line in text.split("\n"))
    h = 2 * 8.5 * px
    dy = 4 * px
    while any(x < b[2] and b[0] < x + w and y0 + dy < b[3] and b[1] < y0 + dy + h for b in placed):
        dy += 3 * px
    placed.append((x, y0 + dy, x + w, y0 + dy + h))
    return dy


def _nice_step(raw: float) -> float:
    """1, 2 or 5 times a power of ten, at least ``raw``."""
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
