"""The report's tables and lines: an evaluation's cells (:func:`format_value`), the table of
several evaluations (:func:`evaluation_table`, one column per field of
:data:`textvae.fields.TABLE_COLUMNS`) and the one-line latent status.

Units: nats per sentence (EOS counted) unless stated.
"""

from __future__ import annotations

from textvae import fields
from textvae.rundir import collapse_reason


def format_value(result: dict, key: str, latent_dim: int | None = None) -> str:
    """The table cell of field ``key`` of an evaluation ``result``: its
    :data:`textvae.fields.EVAL_FIELDS` format; ``nll`` with its standard error, ``au`` with the
    latent size (``latent_dim``, when given) and its threshold, ``iw_samples`` "exact" for a
    model without latent; "–" for a missing value and for the ``rec`` of a model without latent
    (its ``rec`` is its -log p(x): it has no reconstruction term to set beside a VAE's)."""
    value = result.get(key)
    if key == "rec" and exact_nll(result):
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


def exact_nll(result: dict) -> bool:
    """Whether an evaluation's ``nll`` is exact: a model without latent (no KL, no K)."""
    return (
        result.get("nll") is not None and result.get("kl") is None and not result.get("iw_samples")
    )


def _nll_header(rows: dict[str, dict]) -> str:
    """The NLL column's header: IW-NLL, or exact where every row is exact, or both."""
    exact = [exact_nll(r) for r in rows.values() if r.get("nll") is not None]
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


def au_dimensions(model_class: type, model_config) -> int | None:
    """The latent size a table sets beside a run's AU count (``3/32``), from the model class and
    its config alone (the model is not built): D of a latent that is one vector (the class's
    ``latent_shape_of``), None for a model without latent or with a latent of several vectors
    (DELLA's (L, D), whose L may depend on a pretrained backbone).

    Args:
        model_class: the run's model class (``textvae.models.MODELS[model.name]``).
        model_config: its ``model`` section (a dataclass or the run's ``config.yaml`` as read).
    """
    shape = model_class.latent_shape_of(model_config)
    return shape[0] if len(shape) == 1 else None
