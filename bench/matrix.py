"""The remedy matrix: train and evaluate a list of presets on one corpus and budget, one table.

Each entry is a list of config overrides on top of one base preset (default
``configs/ptb/lstm-vae-cpu.yaml``); the remedy entries equal the preset YAMLs next to it
(``lstm-vae-bn-cpu.yaml`` and friends, checked by a test). Every run goes through the library's
own ``textvae.train.train`` and ``textvae.metrics.evaluate`` (the best checkpoint on the test
split, the protocol of SPEC section 3), into ``OUT/<entry>/`` (a run folder like any other, plus
``eval-<split>.json`` and ``matrix.json``), and the table of all entries goes to ``OUT/matrix.md``.

A finished entry (``matrix.json`` present) is reused, not retrained, so an interrupted matrix can
be continued with the same command; an existing run folder without it is never touched: the
matrix stops before training anything and names the folder.

Usage::

    TEXTVAE_DATA_DIR=../shared/data python bench/matrix.py --entries lm,vae,anneal,bn \\
        --max-steps 2000 --iw-samples 100 --eval-sentences 1000 --out-dir runs/matrix-2k

``--corpus`` takes a corpus name (``ptb``) or a folder holding ``train.txt``, ``valid.txt`` and
``test.txt``; ``--set key=value`` applies to every entry. Under ``--max-steps`` the AE-pretraining
entry pretrains for ``--ae-fraction`` of the budget (the preset's 1 of 5 epochs); no other
schedule is rescaled (a KL warm-up longer than the budget stays unfinished; say so with --set).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_BASE = Path(__file__).resolve().parent.parent / "configs" / "ptb" / "lstm-vae-cpu.yaml"


@dataclass
class Entry:
    """One row: overrides on the base preset; ``unavailable`` names why it cannot run yet."""

    description: str
    overrides: list[str] = field(default_factory=list)
    preset: str | None = None  # the preset YAML (next to the base) that equals base + overrides
    unavailable: str | None = None


ENTRIES: dict[str, Entry] = {
    "lm": Entry("LSTM language model (exact NLL)", ["model.name=lstm_lm"], "lstm-lm-cpu.yaml"),
    "vae": Entry("VAE, beta = 1 from step 0", ["kl.schedule=constant"]),
    "anneal": Entry("+ linear KL annealing (Bowman et al. 2016; the base preset)", []),
    "cyclical": Entry("+ cyclical KL schedule (Fu et al. 2019), period 1 PTB epoch",
                      ["kl.schedule=cyclical", "kl.cycle_steps=1315"]),
    "freebits": Entry("+ free bits, 0.1 nats per dimension (Kingma et al. 2016)",
                      ["kl.free_bits=0.1"]),
    "worddrop": Entry("+ word dropout 0.3 on decoder inputs (Bowman et al. 2016)",
                      ["model.word_dropout=0.3"]),
    "pooling": Entry("+ masked max pooling encoder (Long et al. 2019)", ["model.pooling=max"],
                     "lstm-vae-maxpool-cpu.yaml"),
    "aggressive": Entry("+ aggressive inference network (He et al. 2019)",
                        ["train.aggressive=true", "train.aggressive_max_inner=100",
                         "train.aggressive_window=15", "train.eval_every=0"],
                        "lstm-vae-aggressive-cpu.yaml"),
    "bn": Entry("+ BN-VAE, gamma 0.6 (Zhu et al. 2020)", ["model.posterior_bn_gamma=0.6"],
                "lstm-vae-bn-cpu.yaml"),
    "aepretrain": Entry("+ AE pretraining, decoder reset, free bits 0.25 (Li et al. 2019)",
                        ["train.ae_pretrain_steps=1315", "kl.beta_start=0.0", "kl.free_bits=0.25"],
                        "lstm-vae-aepretrain-cpu.yaml"),
    "bow": Entry("+ bag-of-words loss, weight 1 (Zhao et al. 2017)", ["model.bow_weight=1.0"],
                 "lstm-vae-bow-cpu.yaml"),
    "minrate": Entry("+ minimum rate 0.1 nats/dim (delta-VAE style, Razavi et al. 2019)",
                     ["model.min_rate_delta=0.1"], "lstm-vae-minrate-cpu.yaml"),
    "flow": Entry("+ flow VRAE: IAF posterior (4 steps), IAF prior (2), embedding noise 0.5, "
                  "skip connection (Chien & Luo 2022)",
                  ["model.posterior_flow=iaf", "model.posterior_flow_steps=4",
                   "model.flow_hidden=256", "model.prior_flow=iaf", "model.prior_flow_steps=2",
                   "model.embed_noise=0.5", "model.z_skip=true"], "flow-vrae-cpu.yaml"),
}

COLUMNS = ("entry", "settings", "rec", "kl", "nll ± stderr", "ppl_word", "mi", "au (δ)", "z_gap",
           "K", "train s", "eval s")


def corpus_overrides(corpus: str | None) -> list[str]:
    """``data.*`` overrides for a corpus name or a folder with train/valid/test.txt."""
    if corpus is None:
        return []
    folder = Path(corpus)
    if folder.is_dir():
        files = {role: folder / f"{role}.txt" for role in ("train", "valid", "test")}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise SystemExit(f"error: --corpus {corpus}: missing {', '.join(missing)}")
        return ["data.corpus=null"] + [f"data.{role}_path={p}" for role, p in files.items()]
    return [f"data.corpus={corpus}"]


def entry_settings(name: str, args) -> list[str]:
    """The entry's own overrides; under --max-steps AE pretraining takes --ae-fraction of it."""
    items = list(ENTRIES[name].overrides)
    if name == "aepretrain" and args.max_steps is not None:
        items = [o for o in items if not o.startswith("train.ae_pretrain_steps=")]
        items.append(f"train.ae_pretrain_steps={max(1, round(args.ae_fraction * args.max_steps))}")
    return items


def entry_overrides(name: str, args) -> list[str]:
    """The full override list of one entry: corpus, entry settings, budget, common --set."""
    budget = []
    if args.max_steps is not None:
        budget.append(f"train.max_steps={args.max_steps}")
    if args.max_epochs is not None:
        budget.append(f"train.max_epochs={args.max_epochs}")
    return corpus_overrides(args.corpus) + entry_settings(name, args) + budget + list(args.set)


def _fmt(value, fmt: str = "{:.2f}") -> str:
    return "–" if value is None else fmt.format(value)


def effective_settings(record: dict) -> list[str]:
    """The entry's own settings with the values the run actually used: a common ``--set`` of
    the same key comes later in ``overrides`` and wins (e.g. the aggressive entry's
    ``train.aggressive_max_inner=100`` run under ``--set train.aggressive_max_inner=10`` is
    shown as 10)."""
    final = {}
    for item in record.get("overrides", record["settings"]):
        key, _, value = item.partition("=")
        final[key] = value
    return [f"{key}={final.get(key, value)}" for key, _, value in
            (item.partition("=") for item in record["settings"])]


def table_row(record: dict) -> str:
    """One markdown row of a ``matrix.json`` record (settings as the run used them)."""
    name = record["entry"]
    if record.get("unavailable"):
        cells = [name, record["unavailable"]] + ["–"] * (len(COLUMNS) - 2)
        return "| " + " | ".join(cells) + " |"
    r = record["eval"]
    settings = ", ".join(f"`{o}`" for o in effective_settings(record)) or "base preset"
    nll = "–" if r["nll"] is None else f"{r['nll']:.2f} ± {r['nll_stderr']:.2f}"
    au = "–" if r["au"] is None else f"{r['au']} ({r['au_delta']})"
    cells = [name, settings, _fmt(r["rec"]), _fmt(r["kl"]), nll, _fmt(r["ppl_word"], "{:.1f}"),
             _fmt(r["mi"], "{:.3f}"), au, _fmt(r["z_gap"], "{:.3f}"),
             str(r["iw_samples"] or "exact"), f"{record['train_s']:.1f}", f"{record['eval_s']:.1f}"]
    return "| " + " | ".join(cells) + " |"


def run_entry(name: str, base: Path, run_dir: Path, args) -> dict:
    """Train and evaluate one entry; returns (and writes) its ``matrix.json`` record."""
    import textvae
    from textvae.config import load_config
    from textvae.data import TextDataset, load_split
    from textvae.metrics import evaluate
    from textvae.train import train

    overrides = entry_overrides(name, args)
    config = load_config(base, overrides)
    start = time.perf_counter()
    train(config, run_dir)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    model, tokenizer = textvae.load(run_dir, which="best")
    corpus = load_split(config.data, args.split, whole=True)
    texts = corpus.texts[: args.eval_sentences] if args.eval_sentences else corpus.texts
    k = args.iw_samples if args.iw_samples is not None else config.eval.iw_samples
    result = evaluate(model, TextDataset(texts, tokenizer), iw_samples=k,
                      au_delta=config.eval.au_delta, batch_size=config.eval.batch_size,
                      chunk_tokens=config.eval.chunk_tokens, precision=config.eval.precision,
                      seed=args.seed)
    eval_s = time.perf_counter() - start
    result.update(data=corpus.source, split=args.split, seconds=eval_s)
    _write_json(run_dir / f"eval-{args.split}.json", result)
    record = {"entry": name, "description": ENTRIES[name].description,
              "settings": entry_settings(name, args), "overrides": overrides, "base": str(base), "train_s": train_s, "eval_s": eval_s,
              "eval": result}
    _write_json(run_dir / "matrix.json", record)
    return record


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=DEFAULT_BASE, help="base preset YAML")
    p.add_argument("--entries", default="all", help=f"comma list of {', '.join(ENTRIES)} or 'all'")
    p.add_argument("--corpus", help="corpus name, or a folder with train/valid/test.txt")
    p.add_argument("--max-steps", type=int, help="train.max_steps of every entry")
    p.add_argument("--max-epochs", type=int, help="train.max_epochs of every entry")
    p.add_argument("--iw-samples", type=int, help="K of the IW-NLL (default: the config's eval.iw_samples)")
    p.add_argument("--eval-sentences", type=int, help="evaluate the first N sentences of the split")
    p.add_argument("--split", default="test", help="evaluation split (default test)")
    p.add_argument("--seed", type=int, default=0, help="evaluation seed")
    p.add_argument("--ae-fraction", type=float, default=0.2,
                   help="AE-pretraining share of --max-steps (default 0.2)")
    p.add_argument("--out-dir", type=Path, help="matrix folder (default runs/matrix-<UTC time>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for every entry (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = list(ENTRIES) if args.entries == "all" else [n.strip() for n in args.entries.split(",")]
    unknown = [n for n in names if n not in ENTRIES]
    if unknown:
        print(f"error: unknown entries {', '.join(unknown)}; choose from {', '.join(ENTRIES)}",
              file=sys.stderr)
        return 2
    out = args.out_dir or Path("runs") / f"matrix-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    runnable = [n for n in names if ENTRIES[n].unavailable is None]
    blocked = [str(out / n) for n in runnable if (out / n).exists() and any((out / n).iterdir())
               and not (out / n / "matrix.json").is_file()]
    if blocked:
        print(f"error: these run folders exist without a finished matrix record and are left "
              f"untouched: {', '.join(blocked)}; resume them with `textvae train --resume` or "
              "choose another --out-dir", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for name in names:
        entry = ENTRIES[name]
        if entry.unavailable is not None:
            records.append({"entry": name, "unavailable": entry.unavailable})
            continue
        done = out / name / "matrix.json"
        if done.is_file():
            print(f"{name}: finished earlier, reusing {done}")
            records.append(json.loads(done.read_text()))
            continue
        print(f"{name}: training ({entry.description})", flush=True)
        record = run_entry(name, args.config, out / name, args)
        print(f"{name}: train {record['train_s']:.0f} s, eval {record['eval_s']:.0f} s", flush=True)
        records.append(record)
    finished = [r for r in records if "eval" in r]
    first = finished[0]["eval"] if finished else {}
    lines = [
        f"# Remedy matrix: {args.config}",
        "",
        f"Evaluated: {first.get('data', '–')} ({first.get('n_sentences', '–')} sentences, split "
        f"{args.split}), best checkpoint, seed {args.seed}. Budget: "
        f"{'max_steps=' + str(args.max_steps) if args.max_steps else ''}"
        f"{' max_epochs=' + str(args.max_epochs) if args.max_epochs else ''}"
        f"{' (preset budget)' if not (args.max_steps or args.max_epochs) else ''}; "
        f"common overrides: {', '.join(f'`{s}`' for s in args.set) or 'none'}.",
        "rec, kl, nll (± its standard error over sentences), z_gap: nats per sentence; mi: nats "
        "(aggregate posterior over the evaluated set); au: active units (threshold δ); "
        "K: importance samples of the IW-NLL (`exact` for the LM); wall times in seconds.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(COLUMNS) - 2)) + "|",
    ] + [table_row(r) for r in records]
    text = "\n".join(lines) + "\n"
    table = out / "matrix.md"
    tmp = table.with_name(table.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, table)
    print(text)
    print(f"written: {table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
