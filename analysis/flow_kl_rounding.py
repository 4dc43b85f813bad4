"""How the Monte Carlo KL of a flow posterior rounds: the one estimator's ``log q - log p``
(``objectives.kl_estimate``, used by training and evaluation) against the former evaluation's
``ll - log_w`` (17bbe5b's ``metrics.evaluate``: the KL taken from the importance log-weights
``log_w = (ll + log p) - log q``), both compared with float64 arithmetic on the same float32
ingredients (log q, log p, ll).

    PYTHONPATH=src OMP_NUM_THREADS=1 python analysis/flow_kl_rounding.py

A tiny untrained IAF VAE (vocabulary of the test corpus, hidden 16, latent 4, two IAF steps),
64 sentences, 10 samples each. Prints the largest and mean absolute error of each form (nats),
how often each equals the float64 difference rounded to float32, and how often they agree.
Recorded in analysis/README.md ("Flow KL rounding"); the explanation is in
``objectives._monte_carlo``'s docstring.
"""

from __future__ import annotations

import random

import torch

from textvae.config import load_config
from textvae.data import TextDataset, build_tokenizer
from textvae.models import MODELS
from textvae.objectives import kl_estimate, rsample_and_log_prob

WORDS = "the a cat dog sat ran on under mat log big small red blue".split()


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) for _ in range(n)]


def main() -> None:
    tokenizer = build_tokenizer(sentences(200, 0))
    cfg = load_config(
        None,
        [
            "model.embed_dim=16",
            "model.hidden_dim=16",
            "model.latent_dim=4",
            "model.posterior_flow=iaf",
            "model.posterior_flow_steps=2",
            "model.flow_hidden=16",
        ],
    )
    torch.manual_seed(0)
    model = MODELS[cfg.model.name](cfg.model, tokenizer).eval()
    data = TextDataset(sentences(64, 9), tokenizer)
    batch = data.collate(list(range(len(data))))
    with torch.no_grad():
        q, p = model.posterior_and_prior(batch)
        z, log_q = rsample_and_log_prob(q, (10,))
        ll = model.log_likelihood(batch, z)  # (S, B)
        log_p = p.log_prob(z)
        log_w = ll + log_p - log_q  # objectives.iw_log_weights
        old = ll - log_w  # 17bbe5b's evaluation
        new = kl_estimate(q, p, z, log_q).total  # the one estimator: log_q - log_p
    exact = log_q.double() - log_p.double()
    n = exact.numel()
    print(f"rec {-ll.mean():.3f} nats, |KL| {exact.abs().mean():.4f} nats, {n} samples")
    for name, value in (("log q - log p", new), ("ll - log_w", old)):
        err = (value.double() - exact).abs()
        same = int((value == exact.float()).sum())
        print(
            f"{name:14s} max abs error {err.max():.2e}, mean {err.mean():.2e}, "
            f"correctly rounded {same}/{n}"
        )
    print(f"the two forms agree bit for bit in {int((old == new).sum())}/{n}")


if __name__ == "__main__":
    main()
