"""Generation against the model interface: prior samples, reconstructions, interpolation, and
responses of a conditional model (:func:`respond`).

Every function decodes through ``model.decode_step`` (so prior samples pass through the same
learned latent-to-decoder map as training) with one of three strategies:

- ``greedy``: argmax at each step.
- ``sample``: ancestral sampling from softmax(logits / temperature), optionally restricted to
  the ``top_k`` tokens and/or the smallest set of tokens with probability >= ``top_p``.
- ``beam``: batched beam search of width ``beam_size`` (all sentences and beams in one
  (N * beam, ...) decoder batch), scored by total log-probability; finished hypotheses are
  extended by padding at zero cost.
"""

from __future__ import annotations

import torch

STRATEGIES = ("greedy", "sample", "beam")


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits (N, V) outside the top-k / nucleus (Holtzman et al. 2020) with -inf."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        remove = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the first past top_p
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return logits


def _forbidden_ids(model) -> list[int]:
    """Ids generation never emits: pad and ``bos_id``, unless one is also EOS (GPT-2 has one
    special token, ``<|endoftext|>``, for start, end and padding)."""
    return sorted({i for i in (model.pad_id, model.bos_id) if i is not None and i != model.eos_id})


def _select_rows(state, index: torch.Tensor):
    return tuple(s.index_select(0, index) for s in state)


@torch.no_grad()
def decode(
    model,
    z: torch.Tensor | None,
    n: int | None = None,
    strategy: str = "greedy",
    max_length: int = 50,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    beam_size: int = 5,
    state: tuple | None = None,
) -> list[list[int]]:
    """Decode token ids from latent codes.

    Args:
        z: (N, *latent_shape) latent codes, or None for a model without latent (then ``n``
            sentences).
        max_length: most tokens generated per sentence (EOS included).
        state: the state before the first step (batch-first tensors, N rows), for conditional
            models (``model.initial_state(z, batch)``); None lets ``decode_step`` start.

    Returns:
        N lists of token ids, without ``<bos>``, cut before ``<eos>``.

    Raises:
        ValueError: unknown strategy, or neither z nor n given.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy '{strategy}' (use {', '.join(STRATEGIES)})")
    if z is None and n is None:
        raise ValueError("give z or n")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = z.size(0) if z is not None else n
    if strategy == "beam":
        out = _beam(model, z, n, max_length, beam_size, device, state)
    else:
        tokens = torch.full((n,), model.bos_id, dtype=torch.long, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        rows = []
        for _ in range(max_length):
            logits, state = model.decode_step(z, tokens, state)  # (N, V)
            logits = logits.float()
            logits[:, _forbidden_ids(model)] = float("-inf")
            if strategy == "greedy":
                tokens = logits.argmax(-1)
            else:
                logits = _filter_logits(logits / max(temperature, 1e-6), top_k, top_p)
                tokens = torch.multinomial(torch.softmax(logits, -1), 1).squeeze(-1)
            tokens = tokens.masked_fill(done, model.eos_id)
            rows.append(tokens)
            done |= tokens == model.eos_id
            if bool(done.all()):
                break
        out = torch.stack(rows, 1).tolist()
    model.train(was_training)
    return [seq[: seq.index(model.eos_id)] if model.eos_id in seq else seq for seq in out]


def _beam(model, z, n, max_length, beam_size, device, state=None) -> list[list[int]]:
    k = beam_size
    zz = z.repeat_interleave(k, 0) if z is not None else None  # (N*k, D)
    if state is not None:
        state = tuple(s.repeat_interleave(k, 0) for s in state)
    tokens = torch.full((n * k,), model.bos_id, dtype=torch.long, device=device)
    scores = torch.full((n, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: keep one alive
    finished = torch.zeros(n * k, dtype=torch.bool, device=device)
    history = torch.zeros(n * k, 0, dtype=torch.long, device=device)
    for _ in range(max_length):
        logits, state = model.decode_step(zz, tokens, state)
        logp = torch.log_softmax(logits.float(), -1)  # (N*k, V)
        logp[:, _forbidden_ids(model)] = float("-inf")
        # a finished hypothesis only continues with EOS at zero cost
        logp[finished] = float("-inf")
        logp[finished, model.eos_id] = 0.0
        v = logp.size(-1)
        cand = (scores.view(-1, 1) + logp).view(n, k * v)
        scores, flat = cand.topk(k, dim=-1)  # (N, k)
        origin = (flat // v) + torch.arange(n, device=device).unsqueeze(1) * k
        origin = origin.view(-1)
        tokens = (flat % v).view(-1)
        state = _select_rows(state, origin)
        history = torch.cat([history.index_select(0, origin), tokens.unsqueeze(1)], dim=1)
        finished = finished.index_select(0, origin) | (tokens == model.eos_id)
        if bool(finished.all()):
            break
    best = scores.argmax(-1) + torch.arange(n, device=device) * k
    return history.index_select(0, best).tolist()


def ids_to_text(tokenizer, seqs: list[list[int]]) -> list[str]:
    """Token ids to strings, dropping only padding, BOS and EOS.

    Not ``decode(skip_special_tokens=True)``: ``<unk>`` is a special token of every tokenizer
    here, and PTB's text contains it as a word (about 5% of tokens), so skipping special tokens
    silently deleted it from generated sentences ("a <unk> of the" became "a of the"), which
    lowered BLEU against references that keep it and changed distinct-n and self-BLEU. Fixed
    2026-11-21; generation metrics measured before that date dropped ``<unk>``.
    """
    drop = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id} - {None}
    return [
        tokenizer.decode([i for i in s if i not in drop], skip_special_tokens=False).strip()
        for s in seqs
    ]


def _require_latent(model) -> None:
    if not model.has_latent:
        raise ValueError(f"{type(model).__name__} has no latent variable")


@torch.no_grad()
def sample_prior(model, n: int, **options) -> list[str]:
    """n sentences decoded from z ~ p(z) (or from the LM with no latent). ``options``: see
    :func:`decode` (strategy, max_length, temperature, top_k, top_p, beam_size)."""
    device = next(model.parameters()).device
    z = model.prior().sample((n,)).to(device) if model.has_latent else None
    return ids_to_text(model.tokenizer, decode(model, z, n=n, **options))


@torch.no_grad()
def reconstruct(model, texts: list[str], use_mean: bool = True, **options) -> list[str]:
    """Decode each sentence from its posterior mean (or a sample when ``use_mean`` is False)."""
    _require_latent(model)
    q = model.encode(texts)
    z = q.mean if use_mean else q.sample()
    return ids_to_text(model.tokenizer, decode(model, z, **options))


@torch.no_grad()
def respond(model, contexts: list[str], n: int, **options) -> list[list[str]]:
    """n responses to each context from a conditional model: z ~ p(z|c), decoded with
    ``options`` (see :func:`decode`); with greedy decoding the responses differ only through z.
    A conditional model without latent (``seq2seq``) decodes n times from the context alone:
    its n greedy responses are identical, only sampling makes them differ.

    Args:
        contexts: context strings (previous utterances joined by `` __eou__ ``, as
            :func:`textvae.data.context_string` builds them).

    Returns:
        One list of n responses per context, in order.

    Raises:
        ValueError: the model is not conditional, or n < 1.
    """
    from textvae.data import encode_contexts

    if not getattr(model, "conditional", False):
        raise ValueError(f"{type(model).__name__} is not a conditional model: use sample_prior")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batch = {k: v.to(device) for k, v in encode_contexts(model.tokenizer, contexts).items()}
    b = len(contexts)
    z = model.prior(batch).sample((n,)).flatten(0, 1) if model.has_latent else None  # (n*B, *event)
    repeated = {k: v.repeat(n, 1) for k, v in batch.items()}  # (n*B, T_c), sample-major
    state = model.initial_state(z, repeated)
    seqs = ids_to_text(model.tokenizer, decode(model, z, n=n * b, state=state, **options))
    model.train(was_training)
    return [[seqs[s * b + i] for s in range(n)] for i in range(b)]


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between (D,) vectors for weights t (M,) -> (M, D) (latents of
    another shape: interpolate their flattening and reshape)."""
    cos = torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1.0, 1.0))
    if float(omega) < 1e-6:
        return torch.lerp(a.expand(t.size(0), -1), b.expand(t.size(0), -1), t.unsqueeze(1))
    so = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / so).unsqueeze(1) * a + (
        torch.sin(t * omega) / so
    ).unsqueeze(1) * b


def interpolation_weights(steps: int) -> list[float]:
    """The weights t of :func:`interpolate`'s ``steps`` points: evenly spaced from 0 (the first
    sentence) to 1 (the second), ends included; ``[0.0]`` for one step."""
    return torch.linspace(0, 1, steps).tolist()


@torch.no_grad()
def interpolate(
    model, text_a: str, text_b: str, steps: int = 5, method: str = "linear", **options
) -> list[str]:
    """Decode ``steps`` points between the posterior means of two sentences (ends included), at
    the weights :func:`interpolation_weights` gives (z = (1 - t) mu_a + t mu_b when linear).

    Args:
        method: ``linear`` or ``spherical`` (slerp, Shoemake 1985; White 2016 for latents).

    Returns:
        ``steps`` sentences, from ``text_a``'s reconstruction to ``text_b``'s.

    Raises:
        ValueError: the model has no latent variable, or ``method`` is unknown.
    """
    _require_latent(model)
    if method not in ("linear", "spherical"):
        raise ValueError(f"unknown interpolation '{method}' (linear or spherical)")
    mu = model.encode([text_a, text_b]).mean  # (2, *event)
    event = mu.shape[1:]
    flat = mu.reshape(2, -1)  # (2, D); DELLA's (L, D) latents flattened, so slerp sees one vector
    t = torch.tensor(interpolation_weights(steps), device=mu.device)  # (steps,)
    if method == "linear":
        z = torch.lerp(flat[0].expand(steps, -1), flat[1].expand(steps, -1), t.unsqueeze(1))
    else:
        z = slerp(flat[0], flat[1], t)
    z = z.reshape(steps, *event)
    return ids_to_text(model.tokenizer, decode(model, z, **options))
