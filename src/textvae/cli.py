"""Command line: ``textvae train | evaluate | generate | probe | report | compare | sweep``.

The only module that prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shlex
import signal
import sys
import time
from pathlib import Path

EXIT_INTERRUPTED = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal's number, as shells do


def _set_threads(args) -> None:
    """PyTorch's thread count: --threads, else OMP_NUM_THREADS, else the free cores."""
    from textvae.threads import set_threads

    n, reason = set_threads(args.threads)
    print(f"threads: {n} ({reason}; --threads N to choose)", file=sys.stderr)


def _progress(args) -> bool:
    """Progress bars on stderr: unless --no-progress, and only when stderr is a terminal."""
    return not args.no_progress and sys.stderr.isatty()


def _cmd_train(args) -> int:
    from textvae.config import load_config
    from textvae.rundir import default_run_dir
    from textvae.train import TrainingInterrupted, train

    if args.config and "=" in args.config and not Path(args.config).is_file():
        args.overrides.insert(0, args.config)  # `train --resume --run-dir D key=value`
        args.config = None
    if args.resume:
        if args.run_dir is None:
            raise SystemExit("error: --resume needs --run-dir DIR")
        # the starting command with --resume added: same preset and overrides, maybe a new budget
        config = load_config(args.config, args.overrides) if args.config else None
        run_dir = Path(args.run_dir)
        overrides = args.overrides
    else:
        if args.config is None:
            raise SystemExit("error: give a config file (e.g. configs/ptb/lstm-vae-cpu.yaml)")
        config = load_config(args.config, args.overrides)
        run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.config)
        overrides = None
        if args.run_dir is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # several processes: the first one's time-stamped folder for all
            import torch
            from accelerate import PartialState
            from accelerate.utils import broadcast_object_list

            PartialState(cpu=not torch.cuda.is_available())
            run_dir = broadcast_object_list([run_dir])[0]
    _set_threads(args)
    start = time.perf_counter()
    try:
        run_dir = train(config, run_dir, resume=args.resume, overrides=overrides)
    except TrainingInterrupted as stop:
        name = signal.Signals(stop.signum).name
        print(
            f"{name}: training stopped after step {stop.step}; checkpoints/last holds it. "
            f"Continue with:\n  textvae train --resume --run-dir {shlex.quote(str(run_dir))}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED.get(name, 128 + stop.signum)
    if int(os.environ.get("RANK", "0")) == 0:  # the main one of several processes
        print(f"run folder: {run_dir}  ({time.perf_counter() - start:.0f} s)")
    return 0


def _request(cls: type, args, **given):
    """A request dataclass (:class:`textvae.evaluation.EvaluationRequest`, ``ProbeRequest``)
    from the parsed options named as its fields, plus ``given``; a field with no option keeps
    its default (e.g. ``checkpoint``)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)} - set(given)
    return cls(**{n: getattr(args, n) for n in names if hasattr(args, n)}, **given)


def _cmd_evaluate(args) -> int:
    from textvae.evaluation import EvaluationRequest, evaluate_run

    if args.max_sentences is not None and args.max_sentences < 1:
        raise ValueError(
            f"--max-sentences must be at least 1, got {args.max_sentences} (leave "
            "it out to evaluate every sentence)"
        )
    if args.iw_samples is not None and args.iw_samples < 1:
        raise ValueError(
            f"--iw-samples must be at least 1, got {args.iw_samples} (K importance samples of "
            "the bound; K=1 is the ELBO)"
        )
    request = _request(EvaluationRequest, args, progress=_progress(args))
    _set_threads(args)
    result, output = evaluate_run(args.run_dir, request)
    if output is None:  # a process other than the main one of several
        return 0
    _print_evaluation(result, output)
    return 0


def _print_evaluation(result: dict, output) -> None:
    from textvae.fields import UNITS

    has_latent = result["kl"] is not None
    how = f"IW-NLL with K={result['iw_samples']}" if has_latent else "exact likelihood (no latent)"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    processes = f", {world} processes" if world > 1 else ""
    print(
        f"evaluated {result['data']} ({result['n_sentences']} sentences, {how}, "
        f"precision={result['precision']}, {result['seconds']:.0f} s{processes})"
    )
    for key, value in result.items():
        if key == "generation":
            print(f"  {'generation':<12} {json.dumps(value)}")
            continue
        if key in ("nll_per_sentence", "sentence_index", "n_words_per_sentence"):
            continue  # N numbers: in the JSON only
        if value is None and not has_latent:
            continue  # a language model has no latent fields
        if key in ("kl_per_dim", "kl_per_layer"):
            if value is not None:
                rows = value if value and isinstance(value[0], list) else [value]  # (L, D) or (D,)
                shown = " ".join(f"[{', '.join(f'{v:.2f}' for v in row)}]" for row in rows)
                print(f"  {key:<12} {shown}  nats/sentence")
            continue
        if isinstance(value, dict):
            print(f"  {key:<12} {json.dumps(value)}  {UNITS.get(key, '')}".rstrip())
            continue
        shown = (
            "null" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
        )
        note = ""
        if key == "mi" and value is not None and value > math.log(result["n_sentences"]) - 0.05:
            note = f" (saturated: the estimator's maximum is log N = {math.log(result['n_sentences']):.2f})"
        unit = UNITS.get(key, "")
        if key == "nll" and not has_latent:  # a language model's likelihood is exact
            unit = "nats/sentence (exact)"
        print(f"  {key:<12} {shown:>14}  {unit}{note}".rstrip())
    print(f"written: {output}")


_FILE_EXTENSION = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,4}$")  # .txt .tsv .jsonl, not "u.s."


def _names_a_file(value: str) -> bool:
    """Whether an ``--input`` value is meant as a file name: no whitespace, and a path
    separator or a file extension (``recin.tx``, ``data/in``); a sentence has spaces."""
    if not value or any(c.isspace() for c in value):
        return False
    separators = [sep for sep in (os.sep, os.altsep) if sep]
    return any(sep in value for sep in separators) or bool(_FILE_EXTENSION.search(value))


def _read_inputs(items: list[str]) -> list[str]:
    """The lines of ``generate --input``: the non-blank lines of one file, or the values
    themselves as sentences (contexts for ``respond``).

    Raises:
        DataError: a value meant as a file name (:func:`_names_a_file`) names no file, a file is
            given with other values, the file is not UTF-8 (file and line named) or empty.
    """
    from textvae.data import DataError, read_file

    if len(items) == 1 and Path(items[0]).is_file():
        texts, _, _ = read_file(items[0], fmt="text")
        if not texts:
            raise DataError(f"{items[0]}: empty file (no sentence in it; give one per line)")
        return texts
    for value in items:
        if Path(value).is_file():
            raise DataError(f"--input {value} is a file: give one file or sentences, not both")
        if _names_a_file(value):
            what = "is a folder, not a file" if Path(value).is_dir() else "no such file"
            raise DataError(
                f"--input {value}: {what} (a value without spaces that has a file extension "
                "or a path separator is read as a file name; a sentence has spaces)"
            )
    return items


def _generate_respond(model, lines: list[str], n: int, options: dict) -> list[str]:
    """``generate --mode respond``: each context, then its n responses."""
    from textvae.data import context_string, split_utterances
    from textvae.generate import respond

    if not lines:
        raise SystemExit(
            "error: --mode respond needs --input CONTEXT_FILE (one context per "
            "line, utterances separated by __eou__) or contexts"
        )
    window = model.config.data.context_window
    contexts = [context_string(split_utterances(line), window) for line in lines]
    out = []
    for context, responses in zip(contexts, respond(model, contexts, n, **options), strict=True):
        out += [f"# context: {context}", *responses]
    return out


def _generate_from_inputs(model, args, texts: list[str], options: dict) -> list[str]:
    """``generate --mode reconstruct``: INPUT<tab>RECONSTRUCTION per sentence;
    ``--mode interpolate``: t=<weight><tab>SENTENCE per step (t=0: the first sentence)."""
    from textvae.generate import interpolate, interpolation_weights, reconstruct

    if args.mode == "reconstruct":
        if not texts:
            raise SystemExit("error: --mode reconstruct needs --input FILE or sentences")
        outputs = reconstruct(model, texts, **options)
        return [f"{text}\t{out}" for text, out in zip(texts, outputs, strict=True)]
    if len(texts) != 2:
        raise SystemExit(
            f"error: --mode interpolate needs exactly two sentences in --input, got {len(texts)}"
        )
    outputs = interpolate(
        model, texts[0], texts[1], steps=args.n, method=args.interpolation, **options
    )
    weights = interpolation_weights(args.n)
    return [f"t={t:.2f}\t{out}" for t, out in zip(weights, outputs, strict=True)]


def _cmd_generate(args) -> int:
    import torch

    import textvae
    from textvae.generate import sample_prior

    # the inputs first: a mistyped file name fails at once, before the model is loaded
    texts = _read_inputs(args.input or []) if args.mode != "sample" else []
    _set_threads(args)
    torch.manual_seed(args.seed)
    model, _ = textvae.load(args.run_dir)
    options = dict(
        strategy=args.strategy,
        max_length=args.max_length,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        beam_size=args.beam_size,
    )
    if model.conditional != (args.mode == "respond"):
        raise SystemExit(
            "error: --mode respond is for conditional models (cvrae), and a "
            "conditional model only supports --mode respond"
        )
    if args.mode == "respond":
        lines = _generate_respond(model, texts, args.n, options)
    elif args.mode == "sample":
        lines = sample_prior(model, args.n, **options)
    else:
        lines = _generate_from_inputs(model, args, texts, options)
    for line in lines:
        print(line)
    return 0


def _cmd_probe(args) -> int:
    from textvae.evaluation import ProbeRequest, parse_probe_sizes, probe

    request = _request(
        ProbeRequest, args, sizes=parse_probe_sizes(args.labels), progress=_progress(args)
    )
    _set_threads(args)
    record, output = probe(args.run_dir, request)
    print(
        f"probe: fit on {record['fit']} ({record['fit_sentences']} sentences), scored on "
        f"{record['score']} ({record['score_sentences']} sentences); features: posterior mean"
    )
    print("| labelled n | probe accuracy (%) | majority class (%) | subsets |")
    print("|---:|---:|---:|---:|")
    for r in record["results"]:
        print(
            f"| {r['n']} | {100 * r['accuracy']:.1f} ± {100 * r['accuracy_std']:.1f} | "
            f"{100 * r['majority']:.1f} | {r['repeats']} |"
        )
    print(f"written: {output}")
    return 0


def _cmd_report(args) -> int:
    from textvae.report import write_report

    if args.max_sentences < 1:
        raise ValueError(
            f"--max-sentences must be at least 1, got {args.max_sentences} (the first N "
            "sentences of --split for the latent plots and examples)"
        )
    _set_threads(args)
    folder = write_report(
        args.run_dir,
        split=args.split,
        max_sentences=args.max_sentences,
        n_examples=args.examples,
        seed=args.seed,
        progress=_progress(args),
    )
    print(f"written: {folder / 'report.md'}")
    for png in sorted(folder.glob("*.png")):
        print(f"written: {png}")
    return 0


def _cmd_compare(args) -> int:
    from textvae.report import compare_runs

    text, folder = compare_runs(args.run_dirs, args.output, args.eval)
    print(text)
    print(
        f"written: {folder / 'compare.md'}, {folder / 'compare_curves.png'}, "
        f"{folder / 'rate_distortion.png'}"
    )
    return 0


def _cmd_sweep(args) -> int:
    from textvae.sweep import run_sweep
    from textvae.train import train

    start = time.perf_counter()
    folder, summary = run_sweep(args.sweep, args.out_dir, args.storage, args.jobs, train=train)
    trials = summary["trials"]
    states = {}
    for t in trials:
        states[t["state"]] = states.get(t["state"], 0) + 1
    print(f"sweep folder: {folder}  ({time.perf_counter() - start:.0f} s in this invocation)")
    print("trials: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())))
    for t in trials:
        mark = " *" if t["pareto"] else ""
        print(f"  {t['label']:<28} {t['state']:<9} {t['values'] or '-':<24} {t['settings']}{mark}")
    print("(* Pareto front)")
    print(f"written: {folder / 'sweep.md'}, {folder / 'rate_distortion.png'}")
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help already says it in words."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            "default" in text
            or action.default in (None, argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return text + " (default: %(default)s)"


def _heavy(p: argparse.ArgumentParser, progress: bool = True) -> None:
    """Options of every command that computes: --threads (and --no-progress)."""
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads for PyTorch (default: OMP_NUM_THREADS "
        "when set, else the cores that are free when the command starts)",
    )
    if progress:
        p.add_argument(
            "--no-progress",
            action="store_true",
            help="no progress bar on stderr (it is off anyway when stderr is not a terminal)",
        )


def _add_train(command) -> None:
    """The `textvae train` subcommand: its arguments and handler."""
    p = command("train", help="train a model from a preset YAML")
    p.add_argument("config", nargs="?", help="preset YAML (optional with --resume)")
    p.add_argument("overrides", nargs="*", help="dotted overrides key=value")
    p.add_argument("--run-dir", help="run folder (default: runs/<preset>-<time>)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --run-dir (the starting command with --resume added "
        "works: only train.max_steps / train.max_epochs may differ)",
    )
    _heavy(p, progress=False)
    p.set_defaults(func=_cmd_train)


def _add_evaluate(command) -> None:
    """The `textvae evaluate` subcommand: its arguments and handler."""
    p = command("evaluate", help="the evaluation protocol on a split or file")
    p.add_argument("run_dir")
    p.add_argument(
        "--split", default="test", choices=["train", "valid", "test"], help="split to evaluate"
    )
    p.add_argument(
        "--data", help="evaluate this file instead of the config's split (default: none)"
    )
    p.add_argument(
        "--iw-samples",
        type=int,
        help="K >= 1 importance samples of the IW-NLL bound (Burda et al. 2016; K=1 is the "
        "ELBO; default from config: eval.iw_samples)",
    )
    p.add_argument(
        "--max-sentences", type=int, help="only the first N sentences, N >= 1 (default: all)"
    )
    p.add_argument(
        "--batch-size", type=int, help="sentences per batch (default from config: eval.batch_size)"
    )
    p.add_argument(
        "--au-delta", type=float, help="active-unit threshold (default from config: 0.01)"
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        help="bf16: autocast for the network (default from config: eval.precision)",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument(
        "--skip-too-long",
        action="store_true",
        help="leave out (and count in n_skipped) sentences past the model's position "
        "limit instead of failing; sentences are never shortened",
    )
    p.add_argument(
        "--flow-mi-sentences",
        type=int,
        help="flow posteriors: I(x; z_K) over the first N sentences only (it costs N^2 "
        "flow inverses; default 500; 0 = all)",
    )
    p.add_argument(
        "--output",
        help="JSON path (default: RUN_DIR/eval-<split>-<full|N>-K<k>-"
        "<precision>[-gen].json, numbered when taken; never replaces an evaluation)",
    )
    p.add_argument("--overwrite", action="store_true", help="let --output replace an existing file")
    _heavy(p)
    g = p.add_argument_group("generation metrics (--generation)")
    g.add_argument(
        "--generation",
        action="store_true",
        help="add rec_bleu, self_bleu, distinct_1, distinct_2 (sacrebleu)",
    )
    g.add_argument(
        "--gen-sentences",
        type=int,
        default=1000,
        help="reconstruct the first N evaluated sentences for rec_bleu",
    )
    g.add_argument(
        "--gen-samples", type=int, default=500, help="prior samples for self-BLEU and distinct-n"
    )
    g.add_argument(
        "--gen-responses",
        type=int,
        default=5,
        help="conditional models: responses per context (from z ~ p(z|c)) for "
        "response_bleu and distinct-n over the first --gen-sentences contexts",
    )
    g.add_argument(
        "--gen-strategy",
        default="greedy",
        choices=["greedy", "sample"],
        help="decoding of the prior samples (reconstructions are always greedy)",
    )
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--top-k", type=int, default=0, help="top-k sampling (0: off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
    g.add_argument("--max-length", type=int, default=50, help="tokens per decoded sentence at most")
    p.set_defaults(func=_cmd_evaluate)


def _add_generate(command) -> None:
    """The `textvae generate` subcommand: its arguments and handler."""
    p = command("generate", help="prior samples, reconstructions, interpolations, responses")
    p.add_argument("run_dir")
    p.add_argument(
        "--mode",
        default="sample",
        choices=["sample", "reconstruct", "interpolate", "respond"],
        help="sample: N sentences from the prior; reconstruct: one line "
        "INPUT<tab>RECONSTRUCTION per input sentence; interpolate: N lines t=0.00<tab>SENTENCE "
        "... t=1.00<tab>SENTENCE between the two input sentences (t: the weight of the second); "
        "respond (conditional models): N responses to each context of --input",
    )
    p.add_argument(
        "-n", type=int, default=10, help="samples, interpolation steps, or responses per context"
    )
    p.add_argument(
        "--strategy", default="greedy", choices=["greedy", "beam", "sample"], help="decoding"
    )
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
    p.add_argument("--beam-size", type=int, default=5, help="beams of --strategy beam")
    p.add_argument("--max-length", type=int, default=50, help="tokens per sentence at most")
    p.add_argument(
        "--interpolation",
        default="linear",
        choices=["linear", "spherical"],
        help="path between the two posterior means",
    )
    p.add_argument(
        "--input",
        nargs="+",
        help="one file (one sentence per line; for respond one context per line, utterances "
        "separated by __eou__) or sentences (default: none). A value without spaces that has "
        "a file extension (.txt, .tsv, ...) or a path separator is a file name: an error when "
        "there is no such file, never read as a sentence",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    _heavy(p, progress=False)
    p.set_defaults(func=_cmd_generate)


def _add_probe(command) -> None:
    """The `textvae probe` subcommand: its arguments and handler."""
    p = command("probe", help="logistic-regression probe of a label from the posterior mean")
    p.add_argument("run_dir")
    p.add_argument("--data", help="corpus name (default: the run's corpus), e.g. yelp_sentiment")
    p.add_argument(
        "--fit",
        help="split name or labelled file the probe is trained on "
        "(default: the run's train split; yelp_sentiment: test)",
    )
    p.add_argument(
        "--score",
        help="split name or labelled file it is scored on "
        "(default: the run's valid split; yelp_sentiment: dev)",
    )
    p.add_argument("--label-field", default="label", help="label column/key of TSV/JSONL files")
    p.add_argument("--text-field", default="text", help="text column/key of TSV/JSONL files")
    p.add_argument(
        "--labels",
        default="100,1000,all",
        help="labelled-example counts, comma-separated; 'all' = the whole fit set",
    )
    p.add_argument("--repeats", type=int, default=5, help="random subsets per count")
    p.add_argument(
        "--max-sentences",
        type=int,
        help="use only the first N sentences of the fit and of the score set (default: all)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random subsets")
    p.add_argument(
        "--output",
        help="JSON path (default RUN_DIR/probe-<data>.json, or probe-<data>-2.json, ... when "
        "that exists: an earlier probe is never replaced)",
    )
    p.add_argument("--overwrite", action="store_true", help="let --output replace an existing file")
    _heavy(p)
    p.set_defaults(func=_cmd_probe)


def _add_report(command) -> None:
    """The `textvae report` subcommand: its arguments and handler."""
    p = command("report", help="RUN_DIR/report/: report.md and plots")
    p.add_argument("run_dir")
    p.add_argument(
        "--split",
        default="valid",
        choices=["train", "valid", "test"],
        help="sentences for the latent plots and examples",
    )
    p.add_argument(
        "--max-sentences", type=int, default=2000, help="first N >= 1 sentences of --split"
    )
    p.add_argument("--examples", type=int, default=5, help="examples of each kind in report.md")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    _heavy(p)
    p.set_defaults(func=_cmd_report)


def _add_compare(command) -> None:
    """The `textvae compare` subcommand: its arguments and handler."""
    p = command("compare", help="evaluation fields side by side and overlaid curves")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument(
        "--eval",
        default="test",
        help="a split (each run's most complete evaluation of it: more sentences, "
        "then larger K) or an evaluation file name such as eval-test-full-K500-bf16",
    )
    p.add_argument(
        "--output",
        help="folder for compare.md and the plot (default: compare-<runs> beside the first run)",
    )
    p.set_defaults(func=_cmd_compare)


def _add_sweep(command) -> None:
    """The `textvae sweep` subcommand: its arguments and handler."""
    p = command(
        "sweep",
        help="many runs from a sweep YAML: an Optuna search or a grid "
        "(docs/sweep.md); running it again continues it",
    )
    p.add_argument("sweep", help="sweep YAML, e.g. experiments/remedy-matrix.yaml")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="trials in parallel worker processes on this machine, the CPU threads "
        "split between them (default 1)",
    )
    p.add_argument(
        "--storage",
        help="Optuna RDB URL of the study (default "
        "sqlite:///OUT/study.db); postgresql://user:password@host/db lets workers "
        "on several machines share it",
    )
    p.add_argument(
        "--out-dir", help="sweep folder (default: the file's out_dir, else runs/sweep-<name>)"
    )
    p.set_defaults(func=_cmd_sweep)


def build_parser() -> argparse.ArgumentParser:
    from textvae import __version__

    parser = argparse.ArgumentParser(
        prog="textvae",
        description=__doc__,
        formatter_class=_HelpFormatter,
        epilog="Exit codes: 0 done, 1 an error (the message says what to do), 130 training "
        "stopped by SIGINT (Ctrl-C) or 143 by SIGTERM after writing checkpoints/last "
        "(continue with: textvae train --resume --run-dir RUN_DIR).",
    )
    parser.add_argument("--version", action="version", version=f"textvae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, formatter_class=_HelpFormatter, **kwargs)

    for add in (
        _add_train,
        _add_evaluate,
        _add_generate,
        _add_probe,
        _add_report,
        _add_compare,
        _add_sweep,
    ):
        add(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    from textvae.config import ConfigError
    from textvae.data import DataError
    from textvae.rundir import RunDirError
    from textvae.train import TrainingDiverged

    # several processes (torchrun / accelerate launch): the progress lines of the first only
    main_process = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(
        level=logging.INFO if main_process else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (
        ConfigError,
        DataError,
        RunDirError,
        TrainingDiverged,
        FileNotFoundError,
        FileExistsError,
        ValueError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside training (which stops cleanly): nothing was written
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED["SIGINT"]


if __name__ == "__main__":
    sys.exit(main())
