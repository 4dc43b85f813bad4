"""Command line: ``textvae train | evaluate | generate``. The only module that prints."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

UNITS = {
    "rec": "nats/sentence", "kl": "nats/sentence", "elbo": "nats/sentence",
    "nll": "nats/sentence (IW)", "nll_stderr": "nats/sentence", "ppl_token": "per token incl. EOS",
    "ppl_word": "per word incl. EOS", "mi": "nats (aggregate posterior, whole set)",
    "mi_batch": "nats (He et al. 2019 minibatch)", "au": "dimensions", "au_delta": "threshold",
    "iw_samples": "K", "n_sentences": "", "n_tokens": "incl. EOS", "n_words": "incl. EOS",
}


def _cmd_train(args) -> int:
    from textvae.config import load_config
    from textvae.train import default_run_dir, train

    if args.config and "=" in args.config and not Path(args.config).is_file():
        args.overrides.insert(0, args.config)  # `train --resume --run-dir D key=value`
        args.config = None
    if args.resume:
        if args.run_dir is None:
            raise SystemExit("error: --resume needs --run-dir DIR")
        config = load_config(args.config, []) if args.config else None
        run_dir = Path(args.run_dir)
        overrides = args.overrides
    else:
        if args.config is None:
            raise SystemExit("error: give a config file (e.g. configs/ptb/lstm-vae-cpu.yaml)")
        config = load_config(args.config, args.overrides)
        run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.config)
        overrides = None
    start = time.perf_counter()
    run_dir = train(config, run_dir, resume=args.resume, overrides=overrides)
    print(f"run folder: {run_dir}  ({time.perf_counter() - start:.0f} s)")
    return 0


def _dataset_for(model, config, split: str, data: str | None, max_sentences: int | None):
    from textvae.data import TextDataset, load_split

    corpus = load_split(config.data, split, path=data)
    texts, labels = corpus.texts, corpus.labels
    if max_sentences is not None:
        texts = texts[:max_sentences]
        labels = labels[:max_sentences] if labels else labels
    return TextDataset(texts, model.tokenizer, labels), corpus.source


def _cmd_evaluate(args) -> int:
    import textvae
    from textvae.metrics import evaluate

    model, _ = textvae.load(args.run_dir)
    cfg = model.config
    dataset, source = _dataset_for(model, cfg, args.split, args.data, args.max_sentences)
    k = args.iw_samples if args.iw_samples is not None else cfg.eval.iw_samples
    precision = args.precision or cfg.eval.precision
    start = time.perf_counter()
    result = evaluate(model, dataset, iw_samples=k, au_delta=args.au_delta or cfg.eval.au_delta,
                      batch_size=args.batch_size or cfg.eval.batch_size,
                      chunk_tokens=cfg.eval.chunk_tokens, precision=precision, seed=args.seed)
    seconds = time.perf_counter() - start
    output = Path(args.output) if args.output else Path(args.run_dir) / f"eval-{args.split}.json"
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, output)
    print(f"evaluated {source} ({result['n_sentences']} sentences, K={k}, precision={precision}, "
          f"{seconds:.0f} s)")
    for key, value in result.items():
        if key == "kl_per_dim":
            if value is not None:
                print(f"  {'kl_per_dim':<12} [{', '.join(f'{v:.2f}' for v in value)}]  nats/sentence")
            continue
        shown = "null" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"  {key:<12} {shown:>14}  {UNITS.get(key, '')}")
    print(f"written: {output}")
    return 0


def _read_inputs(items: list[str]) -> list[str]:
    if len(items) == 1 and Path(items[0]).is_file():
        lines = Path(items[0]).read_text(encoding="utf-8").splitlines()
        return [line for line in lines if line.strip()]
    return items


def _cmd_generate(args) -> int:
    import torch

    import textvae
    from textvae.generate import interpolate, reconstruct, sample_prior

    torch.manual_seed(args.seed)
    model, _ = textvae.load(args.run_dir)
    options = dict(strategy=args.strategy, max_length=args.max_length, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, beam_size=args.beam_size)
    if args.mode == "sample":
        lines = sample_prior(model, args.n, **options)
    else:
        texts = _read_inputs(args.input or [])
        if args.mode == "reconstruct":
            if not texts:
                raise SystemExit("error: --mode reconstruct needs --input FILE or sentences")
            lines = reconstruct(model, texts, **options)
        else:
            if len(texts) != 2:
                raise SystemExit("error: --mode interpolate needs exactly two sentences in --input")
            lines = interpolate(model, texts[0], texts[1], steps=args.n, method=args.interpolation, **options)
    for line in lines:
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="textvae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a preset YAML")
    p.add_argument("config", nargs="?", help="preset YAML (optional with --resume)")
    p.add_argument("overrides", nargs="*", help="dotted overrides key=value")
    p.add_argument("--run-dir", help="run folder (default: runs/<preset>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="the evaluation protocol on a split or file")
    p.add_argument("run_dir")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--data", help="evaluate this file instead of the config's split")
    p.add_argument("--iw-samples", type=int, help="K of the IW-NLL (default from config: 500)")
    p.add_argument("--max-sentences", type=int, help="only the first N sentences")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--au-delta", type=float)
    p.add_argument("--precision", choices=["fp32", "bf16"], help="bf16: autocast for the network")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="JSON path (default RUN_DIR/eval-<split>.json)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("generate", help="prior samples, reconstructions, interpolations")
    p.add_argument("run_dir")
    p.add_argument("--mode", default="sample", choices=["sample", "reconstruct", "interpolate"])
    p.add_argument("-n", type=int, default=10, help="samples, or interpolation steps")
    p.add_argument("--strategy", default="greedy", choices=["greedy", "beam", "sample"])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--beam-size", type=int, default=5)
    p.add_argument("--max-length", type=int, default=50)
    p.add_argument("--interpolation", default="linear", choices=["linear", "spherical"])
    p.add_argument("--input", nargs="+", help="a file (one sentence per line) or sentences")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    from textvae.config import ConfigError
    from textvae.data import DataError
    from textvae.train import RunDirError, TrainingDiverged

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, RunDirError, TrainingDiverged, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
