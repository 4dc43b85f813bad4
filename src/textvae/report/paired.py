"""Paired statistics: two evaluations of the same sentences compared sentence by sentence.

Two evaluations of the same sentences share most of their variance (long sentences cost every
model more), so the standard error of a difference of mean IW-NLLs is that of the per-sentence
differences, usually far smaller than either run's own standard error.

Units: nats per sentence (EOS counted).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch


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
    if ref.get("sentence_index") is None and other.get("sentence_index") is None:
        a, b = _both_old(ref, other)
    else:
        a, b = _by_index(ref, other)
    if len(a) != len(b):
        raise ValueError(f"different numbers of sentences ({len(b)} vs {len(a)})")
    return torch.tensor(b, dtype=torch.float64) - torch.tensor(a, dtype=torch.float64)


def _both_old(ref: dict, other: dict) -> tuple[list[float], list[float]]:
    """The NLLs of two evaluations without ``sentence_index``, position by position: both must
    be word-level (the same length order) of the same sentence and word counts.

    Raises:
        ValueError: different counts, or a subword tokenizer.
    """
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
    return ref["nll_per_sentence"], other["nll_per_sentence"]


def _by_index(ref: dict, other: dict) -> tuple[list[float], list[float]]:
    """The NLLs of ``ref`` and ``other`` in the sentence order of the one with
    ``sentence_index`` (the first that has it); an old one is put in that order by
    :func:`_in_index_order`.

    Raises:
        ValueError: the two scored different sentences.
    """
    full = ref if ref.get("sentence_index") is not None else other
    index, words = full["sentence_index"], full["n_words_per_sentence"]
    return _values_at(ref, index, words), _values_at(other, index, words)


def _values_at(r: dict, index: list[int], words: list[int]) -> list[float]:
    """``r``'s per-sentence NLLs checked against the sentences ``index`` with ``words`` words.

    Raises:
        ValueError: ``r`` scored other sentences (indices, order or word counts differ).
    """
    if r.get("sentence_index") is None:
        if index != list(range(len(index))) or r.get("n_sentences") != len(index):
            raise ValueError(
                "an evaluation without sentence_index can only be paired with "
                "one of every sentence 0..N-1 of the same N"
            )
        if r.get("n_words") != sum(words):
            raise ValueError("different sentences (word totals differ)")
        return _in_index_order(r, words)
    if r["sentence_index"] != index:
        diff = set(r["sentence_index"]) ^ set(index)
        raise ValueError(
            f"different sentences: {len(diff)} indices scored by one only (e.g. {min(diff)})"
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
    return r["nll_per_sentence"]


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
