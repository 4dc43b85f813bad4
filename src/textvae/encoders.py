"""Sentence encoders and masked temporal pooling (Long, Cao & Cheung 2019, arXiv 1911.03976).

Pooling summarises encoder states h_1..h_T for the posterior heads. It is always masked:
padded positions never contribute, so a sentence's summary does not depend on how much
padding its batch has (the pooling bug of the public T5-VAE and DELLA code).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from textvae.precision import lstm_forward

POOLINGS = ("last", "first", "mean", "max", "attention")


class AttentionPool(nn.Module):
    """Additive attention pooling: a_t = softmax_t(v^T tanh(W h_t)) over real positions."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.score = nn.Linear(dim, 1, bias=False)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.score(torch.tanh(self.proj(states))).squeeze(-1)  # (B, T)
        scores = scores.float().masked_fill(mask == 0, float("-inf"))
        weights = torch.softmax(scores, dim=-1).to(states.dtype)  # (B, T)
        return torch.einsum("bt,bth->bh", weights, states)


def masked_pool(
    states: torch.Tensor, mask: torch.Tensor, mode: str, attention: AttentionPool | None = None
) -> torch.Tensor:
    """Pool encoder states over time, ignoring padding.

    Args:
        states: (B, T, H) encoder states.
        mask: (B, T) 1 on real tokens, 0 on padding; every row has at least one real token.
        mode: ``last`` (state at the last real position), ``first`` (state at position 0: a
            bidirectional encoder's special first token, e.g. DELLA's BOS), ``mean``, ``max`` or
            ``attention``.
        attention: the :class:`AttentionPool` module when ``mode == "attention"``.

    Returns:
        (B, H), same dtype as ``states``.

    Raises:
        ValueError: unknown mode, or ``attention`` missing for attention pooling.
    """
    mask = mask.to(states.device)
    if mode == "last":
        last = mask.sum(1).long() - 1  # (B,)
        return states[torch.arange(states.size(0), device=states.device), last]
    if mode == "first":
        return states[:, 0]
    if mode == "mean":
        m = mask.unsqueeze(-1).to(states.dtype)  # (B, T, 1)
        return (states * m).sum(1) / m.sum(1)
    if mode == "max":
        return states.masked_fill(mask.unsqueeze(-1) == 0, float("-inf")).max(1).values
    if mode == "attention":
        if attention is None:
            raise ValueError("attention pooling needs an AttentionPool module")
        return attention(states, mask)
    raise ValueError(f"unknown pooling '{mode}' (use one of {', '.join(POOLINGS)})")


def delete_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    fraction: float,
    pad_id: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Denoising by token deletion on the encoder input (Park & Lee, Insights @ EMNLP 2021, phase 2).

    In each sentence, ``round(fraction * (n - 1))`` of its n real tokens are deleted, chosen
    uniformly without replacement among all but the last real token (EOS is kept, so every
    sentence keeps at least one token). The survivors keep their order and are packed to the
    left; ids and mask are edited together (Park & Lee's released code swaps the two, a pitfall of public code listed in README);
    columns that hold only padding afterwards are cut. The caller's tensors are not modified,
    so the decoder's target stays the full sentence.

    Park & Lee's code draws the number deleted uniformly from [0, int(fraction * (n - 1))); here
    it is the fraction itself, as the paper states it.

    Args:
        input_ids: (B, T) int64, right-padded; attention_mask: (B, T), 1 on real tokens.
        fraction: p in [0, 1); 0 returns the inputs unchanged without drawing random numbers.
        pad_id: id written into the freed positions.
        generator: the random source (the global one when None).

    Returns:
        (input_ids (B, T'), attention_mask (B, T')), T' <= T, int64 and the mask's dtype.

    Raises:
        ValueError: ``fraction`` outside [0, 1).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return input_ids, attention_mask
    real = attention_mask.bool()
    lengths = real.sum(1)  # (B,)
    positions = torch.arange(input_ids.size(1), device=input_ids.device)
    deletable = real & (positions.unsqueeze(0) < (lengths - 1).unsqueeze(1))  # all but EOS
    n_delete = torch.round(fraction * (lengths - 1).clamp_min(0).double()).long()  # (B,)
    scores = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    scores = scores.masked_fill(~deletable, 2.0)  # never chosen
    rank = scores.argsort(1).argsort(1)  # (B, T): 0 = lowest score
    keep = real & (rank >= n_delete.unsqueeze(1))
    new_len = keep.sum(1)
    target = keep.long().cumsum(1) - 1  # left-packed position of each kept token
    ids = torch.full_like(input_ids, pad_id)
    rows = torch.arange(input_ids.size(0), device=input_ids.device).unsqueeze(1).expand_as(keep)
    ids[rows[keep], target[keep]] = input_ids[keep]
    mask = (positions.unsqueeze(0) < new_len.unsqueeze(1)).to(attention_mask.dtype)
    width = int(new_len.max())
    return ids[:, :width], mask[:, :width]


def encode_context(
    encoder: nn.Module, batch: dict[str, torch.Tensor], model_name: str
) -> torch.Tensor:
    """h_c (B, H_c): ``encoder`` (an :class:`LSTMEncoder`) over a conditional model's context
    tokens ``context_ids`` / ``context_mask`` (B, T_c).

    Raises:
        ValueError: the batch has no context (the model, named ``model_name``, was given a
            corpus without dialogue contexts).
    """
    if "context_ids" not in batch or "context_mask" not in batch:
        raise ValueError(
            f"{model_name} needs context_ids/context_mask in the batch: train and "
            "evaluate it on a dialogue corpus (data.corpus=dailydialog or "
            "data.format=dialogue)"
        )
    return encoder(batch["context_ids"], batch["context_mask"])


class LSTMEncoder(nn.Module):
    """Embedding -> (bi)LSTM -> masked pooling.

    ``forward(input_ids (B, T), attention_mask (B, T)) -> (B, H_out)`` with
    ``H_out = hidden_dim * (2 if bidirectional else 1)``. A unidirectional LSTM runs on the
    right-padded batch directly (states before the padding do not depend on it); a
    bidirectional one is packed so its backward direction starts at each sentence's end.
    For ``last`` pooling with a bidirectional LSTM the summary is [h_T forward; h_1 backward].

    ``noise_std`` > 0: amortised regularisation (Shu et al. 2018, "Amortized Inference
    Regularization"; the encoder-input noise of Chien & Luo's flow VRAE): in training only,
    Gaussian noise N(0, noise_std^2) is added to every input embedding (before input dropout),
    so nearby inputs map to nearby posteriors. Padded positions get noise too; they never
    reach the summary (masked pooling / the states before the padding).

    Raises:
        ValueError: ``pooling`` is not one of :data:`POOLINGS`.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        hidden_dim: int,
        pooling: str = "last",
        bidirectional: bool = False,
        dropout_in: float = 0.0,
        pad_id: int = 0,
        noise_std: float = 0.0,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling '{pooling}' (use one of {', '.join(POOLINGS)})")
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, batch_first=True, bidirectional=bidirectional)
        self.dropout_in = nn.Dropout(dropout_in)
        self.noise_std = noise_std
        self.pooling = pooling
        self.bidirectional = bidirectional
        self.out_dim = hidden_dim * (2 if bidirectional else 1)
        self.attention = AttentionPool(self.out_dim) if pooling == "attention" else None
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        emb = self.embed(input_ids)  # (B, T, E)
        if self.training and self.noise_std > 0:
            emb = emb + self.noise_std * torch.randn_like(emb)
        emb = self.dropout_in(emb)
        if not self.bidirectional:
            states, _ = lstm_forward(self.lstm, emb)  # (B, T, H)
            return masked_pool(states, attention_mask, self.pooling, self.attention)
        lengths = attention_mask.sum(1).cpu()
        packed = pack_padded_sequence(emb, lengths, batch_first=True, enforce_sorted=False)
        out, (h_n, _) = lstm_forward(self.lstm, packed)
        if self.pooling == "last":
            return torch.cat([h_n[-2], h_n[-1]], dim=-1)  # (B, 2H)
        states, _ = pad_packed_sequence(out, batch_first=True, total_length=input_ids.size(1))
        return masked_pool(states, attention_mask, self.pooling, self.attention)
