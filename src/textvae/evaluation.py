"""Evaluate a run folder and probe its latent: the one library entry point behind ``textvae
evaluate``, ``textvae probe`` and a sweep's evaluation of each trial.

- :func:`evaluate_run` (``run_dir``, :class:`EvaluationRequest`) -> (record, path): loads the
  run's ``best`` or ``last`` checkpoint (:func:`textvae.load`), builds the evaluated set
  (:func:`textvae.data.evaluation_dataset`: a split or a file, read whole, optionally its first
  ``max_sentences``), runs the protocol (:func:`textvae.metrics.evaluate`, sharded across the
  processes of ``accelerate launch`` / ``torchrun``), adds the generation metrics when asked
  (:func:`textvae.metrics.generation_metrics`, or :func:`textvae.metrics.response_metrics` for a
  conditional model) and the record fields (``data``, ``split``, ``max_sentences``,
  ``seconds``: :data:`textvae.fields.EVAL_FIELDS`), and writes the JSON atomically
  (:func:`textvae.atomic.write_json`) to ``RUN_DIR/<name>.json`` named by
  :func:`textvae.rundir.evaluation_name` (``-2``, ``-3``, ... when taken: an earlier evaluation
  is never replaced), or to the requested ``output``, refused before any work when it exists
  unless ``overwrite``.
- :func:`probe` (``run_dir``, :class:`ProbeRequest`) -> (record, path): a logistic-regression
  probe of a label from the posterior mean (:func:`textvae.metrics.probe_accuracy`), written to
  ``RUN_DIR/probe-<data>.json`` (numbered when taken) or the requested ``output``.

Neither prints: the CLI parses its arguments into a request, calls one of these and prints the
record (docs/evaluation.md describes every field).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "valid", "test")
CHECKPOINTS = ("best", "last")
PRECISIONS = (None, "fp32", "bf16")


@dataclass(frozen=True)
class EvaluationRequest:
    """What to evaluate and how: ``textvae evaluate``'s options and a sweep's ``evaluation``
    section, one field each (None: the run's ``eval`` config, :class:`textvae.config.EvalConfig`).

    Attributes:
        split: ``train``, ``valid`` or ``test``: the run's split to evaluate.
        data: a file to evaluate instead of the split (its stem names the output).
        checkpoint: ``best`` (best validation ELBO) or ``last``.
        max_sentences: only the first N >= 1 sentences (None: all; recorded in the JSON).
        iw_samples: K >= 1 importance samples of the IW-NLL (None: ``eval.iw_samples``).
        batch_size: sentences per batch (None: ``eval.batch_size``).
        au_delta: the active-unit threshold (None or 0: ``eval.au_delta``).
        precision: ``fp32`` or ``bf16`` (None: ``eval.precision``); bf16 runs as fp32 on a
            device without native bfloat16, and the record and file name say what ran.
        seed: the sampling seed of the protocol and of the generation metrics.
        skip_too_long: leave out (and count in ``n_skipped``) sentences past the model's position
            limit instead of failing.
        flow_mi_sentences: flow posteriors: I(x; z_K) over the first N sentences (None: 500;
            0: all).
        output: the JSON path (None: ``RUN_DIR/<rundir.evaluation_name>.json``, numbered when
            taken).
        overwrite: let ``output`` replace an existing file.
        generation: add the generation metrics (``rec_bleu``, ``self_bleu``, ``distinct_1``,
            ``distinct_2``; for a conditional model ``response_bleu`` and distinct-n).
        gen_sentences: reconstruct (or answer) the first N evaluated sentences (contexts).
        gen_samples: prior samples for self-BLEU and distinct-n.
        gen_responses: conditional models: responses per context.
        gen_strategy: ``greedy`` or ``sample``: decoding of the prior samples and responses
            (reconstructions are always greedy).
        temperature, top_k, top_p: sampling settings (``top_k`` 0 and ``top_p`` 1: off).
        max_length: tokens per decoded sentence at most.
        progress: tqdm bars on stderr.

    Raises:
        ValueError: a value outside the ranges above (the field is named).
    """

    split: str = "test"
    data: str | Path | None = None
    checkpoint: str = "best"
    max_sentences: int | None = None
    iw_samples: int | None = None
    batch_size: int | None = None
    au_delta: float | None = None
    precision: str | None = None
    seed: int = 0
    skip_too_long: bool = False
    flow_mi_sentences: int | None = None
    output: str | Path | None = None
    overwrite: bool = False
    generation: bool = False
    gen_sentences: int = 1000
    gen_samples: int = 500
    gen_responses: int = 5
    gen_strategy: str = "greedy"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_length: int = 50
    progress: bool = False

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"split '{self.split}' is not one of {', '.join(SPLITS)}")
        if self.checkpoint not in CHECKPOINTS:
            raise ValueError(f"checkpoint '{self.checkpoint}' is not best or last")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision '{self.precision}' is not fp32 or bf16")
        if self.max_sentences is not None and self.max_sentences < 1:
            raise ValueError(
                f"max_sentences must be at least 1, got {self.max_sentences} (leave it out, "
                "--max-sentences, to evaluate every sentence)"
            )
        if self.iw_samples is not None and self.iw_samples < 1:
            raise ValueError(
                f"iw_samples must be at least 1, got {self.iw_samples} (K importance samples "
                "of the bound; K=1 is the ELBO)"
            )


def _refuse_existing(path: Path, overwrite: bool) -> Path:
    """``path``, unless it exists and ``overwrite`` is False.

    Raises:
        FileExistsError: it exists (an evaluation or probe is never replaced silently).
    """
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} exists: an evaluation is never replaced silently; pass "
            "--overwrite to replace it, or choose another --output"
        )
    return path


def _unused_path(folder: Path, stem: str) -> Path:
    """``folder/<stem>.json``, or ``<stem>-2.json``, ``-3``, ... when that name is taken: an
    earlier evaluation or probe is never replaced."""
    path, i = folder / f"{stem}.json", 2
    while path.exists():
        path, i = folder / f"{stem}-{i}.json", i + 1
    return path


def evaluation_path(
    run_dir: str | Path,
    request: EvaluationRequest,
    n_sentences: int | None,
    iw_samples: int | None,
    precision: str,
) -> Path:
    """Where an evaluation goes: ``request.output`` (refused when it exists, unless
    ``overwrite``), else ``RUN_DIR/<name>.json`` with the name of
    :func:`textvae.rundir.evaluation_name` (the split, or the evaluated file's stem; ``n_sentences``
    None for the whole set; ``iw_samples`` None for a model without latent; the precision that
    ran; ``-gen`` with generation metrics), ``-2``, ``-3``, ... when taken.

    Raises:
        FileExistsError: ``output`` exists and ``overwrite`` is False.
    """
    from textvae.rundir import evaluation_name

    if request.output:
        return _refuse_existing(Path(request.output), request.overwrite)
    what = request.split if request.data is None else Path(request.data).stem
    stem = evaluation_name(what, n_sentences, iw_samples, precision, request.generation)
    return _unused_path(Path(run_dir), stem)


def _shard():
    """Under ``accelerate launch`` / ``torchrun`` (WORLD_SIZE > 1): the ``PartialState`` whose
    processes share the sentences (gloo on a machine without GPU); None for one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _generation_fields(model, dataset, request: EvaluationRequest) -> dict:
    """The generation metrics of the request (``{}`` without ``generation``): response BLEU and
    distinct-n of the first ``gen_sentences`` contexts for a conditional model, else BLEU of
    reconstructions of the first ``gen_sentences`` sentences and self-BLEU / distinct-n of
    ``gen_samples`` prior samples (docs/evaluation.md)."""
    from textvae.metrics import generation_metrics, response_metrics

    if not request.generation:
        return {}
    options = dict(
        strategy=request.gen_strategy,
        max_length=request.max_length,
        temperature=request.temperature,
        top_k=request.top_k,
        top_p=request.top_p,
        seed=request.seed,
        progress=request.progress,
    )
    n = request.gen_sentences
    if model.conditional:
        return response_metrics(
            model,
            dataset.contexts[:n],
            dataset.texts[:n],
            n_responses=request.gen_responses,
            **options,
        )
    return generation_metrics(model, dataset.texts[:n], n_samples=request.gen_samples, **options)


def evaluate_run(
    run_dir: str | Path, request: EvaluationRequest | None = None
) -> tuple[dict, Path | None]:
    """Evaluate a run folder and write the record: what ``textvae evaluate`` and a sweep's
    trials run (module docstring).

    The record holds exactly the protocol fields (:data:`textvae.fields.EVAL_KEYS`, units as
    :func:`textvae.metrics.evaluate` states: nats per sentence, EOS counted), then ``data`` (the
    file(s) read), ``split`` (None for a file), ``max_sentences`` (None for the whole set), the
    generation fields when asked, and ``seconds`` (wall time from the dataset to the end of
    generation). Under several processes (WORLD_SIZE > 1) each scores its share of the batches
    and gets the same record; only the main one generates and writes.

    Returns:
        (record, path written); path None on a process other than the main one.

    Raises:
        FileExistsError: ``request.output`` exists and ``overwrite`` is False (before any work).
        FileNotFoundError, textvae.rundir.RunDirError: not a run folder, or no such checkpoint.
        textvae.data.DataError: the split or file cannot be read.
        ValueError: from :func:`textvae.metrics.evaluate` (e.g. sentences past the model's
            position limit without ``skip_too_long``).
    """
    import textvae
    from textvae.atomic import write_json
    from textvae.data import evaluation_dataset
    from textvae.metrics import evaluate
    from textvae.precision import runnable_precision

    request = request or EvaluationRequest()
    if request.output:
        _refuse_existing(Path(request.output), request.overwrite)  # before the work
    model, tokenizer = textvae.load(run_dir, which=request.checkpoint)
    cfg = model.config
    shard = _shard()
    if shard is not None:
        model.to(shard.device)
    dataset, source, full = evaluation_dataset(
        cfg.data, tokenizer, request.split, request.data, request.max_sentences
    )
    k = request.iw_samples if request.iw_samples is not None else cfg.eval.iw_samples
    # what runs names the file: bf16 on a device without native bfloat16 runs (and is named) fp32
    device = next(model.parameters()).device
    precision = runnable_precision(request.precision or cfg.eval.precision, device)
    start = time.perf_counter()
    record = evaluate(
        model,
        dataset,
        iw_samples=k,
        au_delta=request.au_delta or cfg.eval.au_delta,
        batch_size=request.batch_size or cfg.eval.batch_size,
        chunk_tokens=cfg.eval.chunk_tokens,
        precision=precision,
        seed=request.seed,
        skip_too_long=request.skip_too_long,
        flow_mi_sentences=request.flow_mi_sentences,
        progress=request.progress,
        num_processes=shard.num_processes if shard else 1,
        process_index=shard.process_index if shard else 0,
    )
    record["data"], record["split"] = source, request.split if request.data is None else None
    record["max_sentences"] = None if full else len(dataset)
    if shard is not None and not shard.is_main_process:
        shard.wait_for_everyone()  # the main process generates and writes
        return record, None
    record.update(_generation_fields(model, dataset, request))
    record["seconds"] = time.perf_counter() - start
    n = None if full else len(dataset)
    path = evaluation_path(run_dir, request, n, k if model.has_latent else None, precision)
    path = write_json(path, record)
    if shard is not None:
        shard.wait_for_everyone()
    return record, path


# --- the latent probe ------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeRequest:
    """What ``textvae probe`` fits and scores.

    Attributes:
        data: a corpus name (None: the run's corpus), e.g. ``yelp_sentiment``.
        fit: a split name or labelled file the probe is trained on (None: the run's train split;
            a corpus's ``probe_splits`` first, e.g. yelp_sentiment's test).
        score: a split name or labelled file it is scored on (None: the run's valid split; a
            corpus's ``probe_splits`` second, e.g. yelp_sentiment's dev).
        label_field, text_field: the label and text column/key of TSV/JSONL files.
        sizes: labelled-example counts, None = the whole fit set (:func:`parse_probe_sizes`).
        repeats: random subsets per count.
        max_sentences: only the first N sentences of the fit and of the score set (None: all).
        seed: the seed of the random subsets.
        checkpoint: ``best`` or ``last``.
        output: the JSON path (None: ``RUN_DIR/probe-<data>.json``, numbered when taken).
        overwrite: let ``output`` replace an existing file.
        progress: tqdm bars on stderr.
    """

    data: str | None = None
    fit: str | None = None
    score: str | None = None
    label_field: str = "label"
    text_field: str = "text"
    sizes: tuple[int | None, ...] = (100, 1000, None)
    repeats: int = 5
    max_sentences: int | None = None
    seed: int = 0
    checkpoint: str = "best"
    output: str | Path | None = None
    overwrite: bool = False
    progress: bool = False


def parse_probe_sizes(text: str) -> tuple[int | None, ...]:
    """``"100,1000,all"`` -> (100, 1000, None): labelled-example counts, ``all`` = the whole fit
    set.

    Raises:
        ValueError: an item that is neither a count nor ``all`` (the item is named).
    """
    sizes = []
    for item in text.split(","):
        item = item.strip()
        if item == "all":
            sizes.append(None)
        elif item.isdigit():
            sizes.append(int(item))
        else:
            raise ValueError(f"--labels: '{item}' is not a count or 'all'")
    return tuple(sizes)


def probe_split(cfg, request: ProbeRequest, which: str | None, role: str):
    """(texts, labels, source) of the probe's fit (``role`` ``train``) or score (``valid``) set:
    a labelled file when ``which`` is one, the run's own files when nothing names a corpus,
    else split ``which`` of ``request.data`` (or the run's corpus), by default the corpus's
    ``probe_splits`` or the run's train / valid split.

    Raises:
        textvae.data.DataError: no corpus to read, no split named for another corpus, or a set
            without labels.
    """
    from textvae.data import DataError, load_split, named_corpus

    data_cfg = dataclasses.replace(cfg.data, train_limit=None, valid_limit=None)
    if which is not None and Path(which).is_file():
        data_cfg = dataclasses.replace(
            data_cfg, corpus=None, label_field=request.label_field, text_field=request.text_field
        )
        corpus = load_split(data_cfg, role, path=which)
    elif which is None and request.data is None and cfg.data.corpus is None:
        corpus = load_split(data_cfg, role)  # the run's own files
    else:
        name = request.data or cfg.data.corpus
        if name is None:
            raise DataError("probe: give --data CORPUS, or --fit and --score files")
        if which is None:
            spec = named_corpus(name)
            if spec is not None and spec.probe_splits is not None:  # yelp_sentiment: test, dev
                which = spec.probe_splits[0 if role == "train" else 1]
            elif name == cfg.data.corpus:
                which = cfg.data.train_split if role == "train" else cfg.data.valid_split
            else:
                raise DataError(f"probe: say which splits of {name} to use (--fit, --score)")
        data_cfg = dataclasses.replace(data_cfg, corpus=name, **{f"{role}_split": which})
        corpus = load_split(data_cfg, role)
    if corpus.labels is None:
        raise DataError(
            f"probe: {corpus.source} has no labels (give --label-field for "
            "TSV/JSONL files, or a labelled corpus such as yelp_sentiment)"
        )
    return corpus.texts, corpus.labels, corpus.source


def posterior_means(model, dataset, progress: bool = False, desc: str = "encode"):
    """E_q[z|x] of every sentence of ``dataset``, flattened: (N, prod(latent_shape)) float32 on
    the CPU, in dataset order (batches of 256; E_q[z_K|x] by 256 common random draws for a
    flow, :attr:`textvae.flows.FlowDistribution.mean`)."""
    import torch
    from tqdm.auto import tqdm

    mu = torch.empty(len(dataset), math.prod(model.latent_shape))
    with torch.no_grad():
        bar = tqdm(total=len(dataset), desc=desc, unit="sent", leave=False, disable=not progress)
        for indices in dataset.batches(256):
            mu[indices] = model.posterior(dataset.collate(indices)).mean.float().flatten(1)
            bar.update(len(indices))
        bar.close()
    return mu


def probe(run_dir: str | Path, request: ProbeRequest | None = None) -> tuple[dict, Path]:
    """Fit a logistic-regression probe of a label on the posterior means of the fit set and
    score it on the score set (:func:`textvae.metrics.probe_accuracy`); write the record.

    Returns:
        (record, path written): ``fit``, ``score`` (sources), ``fit_sentences``,
        ``score_sentences``, ``features``, ``classifier``, ``seed`` and ``results`` (one dict
        per size: ``n``, ``accuracy``, ``accuracy_std``, ``majority``, ``repeats``; fractions).

    Raises:
        FileExistsError: ``request.output`` exists and ``overwrite`` is False (before any work).
        ValueError: the model has no latent variable, or a size does not fit the fit set.
        textvae.data.DataError: from :func:`probe_split`.
    """
    import textvae
    from textvae.atomic import write_json
    from textvae.data import TextDataset
    from textvae.metrics import probe_accuracy

    request = request or ProbeRequest()
    if request.output:
        _refuse_existing(Path(request.output), request.overwrite)  # before the work
    model, tokenizer = textvae.load(run_dir, which=request.checkpoint)
    if not model.has_latent:
        raise ValueError(f"{run_dir}: the model has no latent variable to probe")
    cfg = model.config
    features = {}
    for role, which in (("train", request.fit), ("valid", request.score)):
        texts, labels, source = probe_split(cfg, request, which, role)
        if request.max_sentences is not None:
            texts, labels = texts[: request.max_sentences], labels[: request.max_sentences]
        dataset = TextDataset(texts, tokenizer, labels)
        mu = posterior_means(model, dataset, request.progress, f"encode {role}")
        features[role] = (mu, labels, source)
    (fit_x, fit_y, fit_src), (score_x, score_y, score_src) = features["train"], features["valid"]
    results = probe_accuracy(
        fit_x, fit_y, score_x, score_y, list(request.sizes), request.repeats, request.seed
    )
    record = {
        "fit": fit_src,
        "score": score_src,
        "fit_sentences": len(fit_y),
        "score_sentences": len(score_y),
        "features": f"posterior mean (D={math.prod(model.latent_shape)})",
        "classifier": "sklearn StandardScaler + LogisticRegression(max_iter=2000)",
        "seed": request.seed,
        "results": results,
    }
    fit_file = request.fit is not None and Path(request.fit).is_file()
    name = request.data or (Path(request.fit).stem if fit_file else cfg.data.corpus) or "data"
    path = Path(request.output) if request.output else _unused_path(Path(run_dir), f"probe-{name}")
    return record, write_json(path, record)
