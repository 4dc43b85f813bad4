"""Markdown table of `textvae evaluate` JSON files, for the write-ups in docs/results/.

Usage: python analysis/eval_table.py [--layers] NAME=PATH/eval.json ...

Columns: rec, KL, IW-NLL ± stderr (nats per sentence; "exact" when the model has no latent),
PPL per word and per model token, the single-sample ELBO perplexity per token (Park & Lee's
code's figure, not a bound on the PPL), MI, AU at delta 0.01 and 0.2, the z-usage gap, whether
the numbers are bounds (``bound_valid``) and the evaluation's wall time. ``--layers`` adds KL and
AU (delta 0.01) per latent layer for layer-wise models (DELLA) and DELLA's own AU figure
(``au_layer_mean``: the mean over layers of the per-layer count at delta 0.2). After the table: each entry's
IW-NLL minus the first entry's, paired over sentences (textvae.report.paired_differences), for
the entries whose JSON has ``nll_per_sentence``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from textvae.fields import field
from textvae.report import format_value, paired_differences

# the evaluation fields shown as they are (header and format: textvae.fields.EVAL_FIELDS)
FIELDS = ("rec", "kl", "nll", "iw_samples", "ppl_word", "ppl_token", "ppl_elbo_token", "mi")


def row(name: str, r: dict, layers: bool) -> str:
    au = r.get("au_by_delta") or {}
    # latent size from kl_per_dim, (D,) or (L, D) for DELLA; unknown without it (flows)
    n_dims = torch.tensor(r["kl_per_dim"]).numel() if r.get("kl_per_dim") else None

    def au_at(delta: str) -> str:
        if r.get("au") is None:
            return "–"
        count = au.get(delta, r["au"] if delta == str(r.get("au_delta")) else None)
        return "?" if count is None else f"{count}/{n_dims}" if n_dims else str(count)

    cells = [
        name,
        *(format_value(r, key) for key in FIELDS),
        au_at("0.01"),
        au_at("0.2"),
        format_value(r, "z_gap"),
        "yes" if r.get("bound_valid", True) else "**no**",
        f"{r['seconds'] / 60:.1f}",
    ]
    if layers:
        kl_layers = r.get("kl_per_layer")
        au_layers = (r.get("au_per_layer") or {}).get("0.01")
        cells += [
            " / ".join(f"{x:.2f}" for x in kl_layers) if kl_layers else "–",
            " / ".join(str(x) for x in au_layers) if au_layers else "–",
            "–" if r.get("au_layer_mean") is None else f"{r['au_layer_mean']:.1f}",
        ]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("entries", nargs="+", help="NAME=PATH to an evaluation JSON")
    parser.add_argument("--layers", action="store_true", help="add KL and AU per latent layer")
    args = parser.parse_args(argv)
    head = [
        "run",
        *(field(key).column for key in FIELDS),
        "AU (0.01)",
        "AU (0.2)",
        field("z_gap").column,
        "bound",
        "eval min",
    ]
    if args.layers:
        head += ["KL per layer", "AU per layer (0.01)", "AU layer mean (0.2, DELLA A.3)"]
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    rows: dict[str, dict] = {}
    for entry in args.entries:
        name, sep, path = entry.rpartition("=")
        if not sep:
            parser.error(f"entry {entry!r} is not NAME=PATH")
        rows[name] = json.loads(Path(path).read_text())
        print(row(name, rows[name], args.layers))
    print()
    print("\n".join(paired_differences(rows)))


if __name__ == "__main__":
    main()
