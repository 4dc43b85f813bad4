"""The one table of evaluation fields: name, unit, meaning, and how a table shows it.

Everything that names an evaluation field renders from :data:`EVAL_FIELDS`: the evaluation JSON of
``textvae evaluate`` holds the "protocol" fields (:func:`textvae.metrics.evaluate` returns exactly
:data:`EVAL_KEYS`, in this order), the "record" fields and, with ``--generation``, the
"generation" (or, for conditional models, "response") fields; the CLI prints each value with its
:data:`UNITS`; docs/evaluation.md's key tables are :func:`fields_markdown`
(tests/test_first_day.py checks docs/evaluation.md against it); and the markdown tables of
``textvae report``, ``textvae compare`` and ``sweep.md`` (:func:`textvae.report.evaluation_table`) have one column per name in
:data:`TABLE_COLUMNS`, headed by the field's ``column`` and formatted by its ``format``.

A new evaluation field is one :class:`Field` here (plus its name in :data:`TABLE_COLUMNS` to be a
table column) and the code in :mod:`textvae.metrics` that computes it.
"""

from __future__ import annotations

from typing import NamedTuple


class Field(NamedTuple):
    """One evaluation field.

    Attributes:
        group: ``protocol`` (returned by :func:`textvae.metrics.evaluate`), ``record`` (added
            by ``textvae evaluate``), ``generation`` or ``response`` (with ``--generation``).
        name: its key in the evaluation JSON.
        unit: its unit as printed, e.g. ``nats/sentence``.
        meaning: one line for docs/evaluation.md's key table (markdown).
        column: the header of its column in evaluation tables (units included), None if it is
            never a column.
        format: ``str.format`` pattern of a value in a table cell; None where the table writes it
            its own way (``nll`` with its standard error, ``au`` with its threshold and the
            latent size).
        objective: a number a sweep may be scored on (``objectives`` of a sweep file).
    """

    group: str
    name: str
    unit: str
    meaning: str
    column: str | None = None
    format: str | None = None
    objective: bool = False


EVAL_FIELDS: tuple[Field, ...] = (
    Field(
        "protocol",
        "rec",
        "nats/sentence",
        "E_q[-log p(x|z)], Monte Carlo over the K samples",
        column="rec (nats/sent)",
        format="{:.2f}",
        objective=True,
    ),
    Field(
        "protocol",
        "kl",
        "nats/sentence",
        "KL(q(z|x) || p(z)): closed form, or Monte Carlo with `kl_samples` samples (flows; layer-wise for DELLA)",
        column="KL (nats/sent)",
        format="{:.3f}",
        objective=True,
    ),
    Field(
        "protocol",
        "kl_samples",
        "MC samples/sentence (null: closed form)",
        "samples behind a Monte Carlo `kl`",
    ),
    Field(
        "protocol",
        "elbo",
        "nats/sentence",
        "-(rec + kl)",
        column="ELBO (nats/sent)",
        format="{:.2f}",
        objective=True,
    ),
    Field(
        "protocol",
        "nll",
        "nats/sentence (IW)",
        "IW estimate -log (1/K) Σ p(x,z_k)/q(z_k|x) (Burda et al. 2016); exact for the LM",
        column="IW-NLL (nats/sent)",
        objective=True,
    ),
    Field("protocol", "nll_stderr", "nats/sentence", "standard error of `nll` over sentences"),
    Field(
        "protocol",
        "ppl_token",
        "per token incl. EOS",
        "exp(Σ nll / predicted tokens)",
        column="PPL (per token)",
        format="{:.1f}",
        objective=True,
    ),
    Field(
        "protocol",
        "ppl_word",
        "per word incl. EOS",
        "exp(Σ nll / (whitespace words + one EOS per sentence)); comparable across tokenizers",
        column="PPL (per word)",
        format="{:.1f}",
        objective=True,
    ),
    Field(
        "protocol",
        "ppl_elbo_token",
        "per token incl. EOS",
        "exp(-Σ elbo / tokens): a bound, Park & Lee's 'PPL', not the NLL",
        column="ELBO-PPL (per token)",
        format="{:.1f}",
        objective=True,
    ),
    Field(
        "protocol",
        "mi",
        "nats (aggregate posterior, whole set)",
        "I_q(x;z) with the aggregate posterior over the **whole** evaluated set (chunked, memory linear in the set; at most log N); for a flow posterior I(x; z_K) through the flow's inverse (N^2 inverses: over the first 500 sentences unless `--flow-mi-sentences N` says otherwise, 0 = all), null with the reason in `mi_estimator` where it cannot be computed",
        column="MI (nats)",
        format="{:.3f}",
        objective=True,
    ),
    Field(
        "protocol",
        "mi_batch",
        "nats (He et al. 2019 minibatch)",
        "the minibatch estimator of He et al. 2019, over the evaluation batches",
        column="MI batch (nats)",
        format="{:.3f}",
        objective=True,
    ),
    Field(
        "protocol",
        "au",
        "dimensions",
        "dimensions with Cov_x(E_q[z|x]) > `au_delta`",
        column="AU",
        objective=True,
    ),
    Field("protocol", "au_delta", "threshold", "the active-unit threshold (default 0.01)"),
    Field(
        "protocol", "kl_per_dim", "nats/sentence", "mean KL per latent dimension (null for a flow)"
    ),
    Field(
        "protocol",
        "z_gap",
        "nats/sentence (rec with shuffled z - rec with own z)",
        "z-usage gap: rec with z shuffled across the batch minus rec with each sentence's own z (one z ~ q per sentence, a derangement, so no sentence keeps its z); 0 = the decoder ignores z",
        column="z-usage gap (nats/sent)",
        format="{:.3f}",
        objective=True,
    ),
    Field(
        "protocol",
        "iw_samples",
        "K",
        "importance samples K (null for the exact LM)",
        column="K",
        format="{}",
    ),
    Field(
        "protocol",
        "n_sentences",
        "sentences",
        "evaluated sentences",
        column="sentences",
        format="{}",
    ),
    Field("protocol", "n_tokens", "incl. EOS", "predicted tokens"),
    Field("protocol", "n_words", "incl. EOS", "whitespace words plus one EOS per sentence"),
    Field("protocol", "tokenizer", "", "tokenizer kind and size"),
    Field("protocol", "mi_estimator", "", "how `mi` and `mi_batch` were estimated"),
    Field("protocol", "precision", "", "fp32, or bf16 autocast for the network"),
    Field("protocol", "seed", "", "sampling seed"),
    Field(
        "protocol",
        "au_by_delta",
        "active dimensions at each threshold (0.2: DELLA's)",
        "`au` at `au_delta` and at 0.2",
    ),
    Field("protocol", "kl_per_layer", "nats/sentence per latent layer", "layer-wise latents only"),
    Field(
        "protocol",
        "au_per_layer",
        "active dimensions per latent layer, at each threshold",
        "layer-wise latents only",
    ),
    Field(
        "protocol",
        "bound_valid",
        "false: elbo/nll are not bounds (kl_reduction: mean)",
        "whether `elbo` and `nll` bound log p(x)",
    ),
    Field(
        "protocol",
        "nll_per_sentence",
        "nats/sentence, dataset order",
        "the per-sentence IW-NLLs behind `nll` in dataset order (JSON only): `textvae compare` and `analysis/eval_table.py` pair two evaluations by `sentence_index` and refuse evaluations of different sentences",
    ),
    Field(
        "protocol",
        "sentence_index",
        "dataset positions",
        "the dataset position of each `nll_per_sentence` value (JSON only)",
    ),
    Field(
        "protocol",
        "n_words_per_sentence",
        "incl. EOS",
        "whitespace words + 1 of each evaluated sentence (JSON only)",
    ),
    Field(
        "protocol",
        "n_skipped",
        "sentences past the model's position limit (--skip-too-long)",
        "sentences left out with `--skip-too-long` (else such a sentence is an error); every sentence is scored whole",
    ),
    Field(
        "protocol",
        "encoder_dispersion",
        "of the encoder summaries (Long et al. 2019)",
        "Long et al. 2019's encoder feature dispersion: total and relative variance and mean pairwise cosine distance of the summaries the posterior heads read (null values with a `reason` for DELLA)",
    ),
    Field(
        "protocol",
        "classifier_accuracy",
        "fraction (classifier on E_q[z|x])",
        "a jointly trained classifier on z (`model.classifier_weight`): accuracy on the labelled sentences",
        objective=True,
    ),
    Field(
        "protocol", "classifier_n", "labelled sentences", "sentences behind `classifier_accuracy`"
    ),
    Field(
        "protocol",
        "au_layer_mean",
        "mean over layers of the per-layer AU at 0.2 (DELLA A.3)",
        "layer-wise latents: DELLA's own active-unit figure, comparable with the paper's table",
    ),
    Field("record", "data", "", "the evaluated file"),
    Field("record", "split", "", "the split name (null for `--data FILE`)"),
    Field(
        "record", "max_sentences", "", "the `--max-sentences` cap (null: the whole split or file)"
    ),
    Field("record", "seconds", "s", "wall time of the evaluation"),
    Field(
        "generation",
        "rec_bleu",
        "BLEU 0-100 (greedy reconstruction vs input)",
        "sacrebleu corpus BLEU of greedy decodings of each sentence's posterior mean against the sentence, over the first `--gen-sentences` evaluated sentences",
        column="rec BLEU",
        format="{:.1f}",
        objective=True,
    ),
    Field(
        "generation",
        "self_bleu",
        "BLEU 0-100 (prior samples vs each other)",
        "mean sentence BLEU of each of `--gen-samples` prior samples against all the others (Zhu et al. 2018); high = repetitive",
        column="self-BLEU",
        format="{:.1f}",
        objective=True,
    ),
    Field(
        "generation",
        "distinct_1",
        "distinct unigrams / unigrams (prior samples; responses for cvrae)",
        "distinct unigrams over all unigrams (Li et al. 2016)",
        column="distinct-1",
        format="{:.3f}",
        objective=True,
    ),
    Field(
        "generation",
        "distinct_2",
        "distinct bigrams / bigrams (prior samples; responses for cvrae)",
        "distinct bigrams over all bigrams",
        column="distinct-2",
        format="{:.3f}",
        objective=True,
    ),
    Field("generation", "generation", "", "decoding settings and sacrebleu signatures"),
    Field(
        "response",
        "response_bleu",
        "BLEU 0-100 (responses from z ~ p(z|c) vs the reference)",
        "conditional models: corpus BLEU of `--gen-responses` responses per context",
        objective=True,
    ),
)
UNITS = {f.name: f.unit for f in EVAL_FIELDS}
EVAL_KEYS = tuple(f.name for f in EVAL_FIELDS if f.group == "protocol")
# the columns of the evaluation tables (report, compare, sweep.md), in order
TABLE_COLUMNS = (
    "rec",
    "kl",
    "elbo",
    "nll",
    "ppl_word",
    "mi",
    "au",
    "z_gap",
    "rec_bleu",
    "self_bleu",
    "distinct_1",
    "distinct_2",
    "iw_samples",
    "n_sentences",
)


def objective_fields() -> tuple[str, ...]:
    """The names of the fields a sweep may optimise (``objective``), in table order."""
    return tuple(f.name for f in EVAL_FIELDS if f.objective)


def field(name: str) -> Field:
    """The :class:`Field` called ``name``.

    Raises:
        KeyError: no such field (the known names are listed).
    """
    for f in EVAL_FIELDS:
        if f.name == name:
            return f
    raise KeyError(f"no evaluation field {name!r}; known: {', '.join(f.name for f in EVAL_FIELDS)}")


def table_fields() -> list[Field]:
    """The fields of :data:`TABLE_COLUMNS`, in that order.

    Raises:
        ValueError: a name in :data:`TABLE_COLUMNS` has no ``column`` header.
    """
    out = [field(name) for name in TABLE_COLUMNS]
    missing = [f.name for f in out if f.column is None]
    if missing:
        raise ValueError(f"textvae.fields: {missing} in TABLE_COLUMNS have no column header")
    return out


def fields_markdown(groups: tuple[str, ...] = ("protocol", "record")) -> str:
    """docs/evaluation.md's key table (``| key | unit | meaning |``) of the :data:`EVAL_FIELDS` in
    ``groups``, one row per field."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| key | unit | meaning |", "|---|---|---|"]
    lines += [
        f"| `{f.name}` | {cell(f.unit)} | {cell(f.meaning)} |"
        for f in EVAL_FIELDS
        if f.group in groups
    ]
    return "\n".join(lines)
