"""Decoders: the sequence log-likelihood every model scores with (:func:`sequence_log_prob`),
the autoregressive LSTM decoder p(x | z) (Bowman et al. 2016; He et al. 2019 configuration)
and the bag-of-words head (Zhao et al. 2017)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from textvae.precision import lstm_forward


def shift_right(input_ids: torch.Tensor, bos_id: int) -> torch.Tensor:
    """Decoder inputs: ``<bos>`` followed by all but the last column. (B, T) -> (B, T).

    With right padding, every real target (EOS included) is predicted from ``<bos>`` and the
    real tokens before it; positions past a sentence's EOS are masked out of the loss.
    """
    bos = torch.full_like(input_ids[:, :1], bos_id)
    return torch.cat([bos, input_ids[:, :-1]], dim=1)


def sequence_log_prob(
    hidden: torch.Tensor,
    output: torch.nn.Module,
    targets: torch.Tensor,
    mask: torch.Tensor,
    float32_softmax: bool = True,
    block_rows: int = 512,
) -> torch.Tensor:
    """log p(x) of each sequence: sum over real positions of log softmax(output(h_t))[x_t].

    The output projection runs only on real positions (padding costs nothing), in blocks of
    ``block_rows`` positions so that the (block, V) logits stay in cache while they are cast
    and normalised (measured 1.5x faster than one (M, V) pass on CPU, bench/RESULTS.md);
    per-sentence sums are accumulated in float32.

    Args:
        hidden: (N, T, H) decoder outputs; position t predicts ``targets[:, t]``.
        output: the vocabulary projection, H -> V.
        targets: (N, T) int64 token ids.
        mask: (N, T), 1 on real tokens (EOS included), 0 on padding.
        float32_softmax: take the log-softmax in float32 even under bf16 autocast (always for
            evaluation). False lets training under bf16 autocast keep it in bf16, which is
            about a third cheaper; the per-token rounding (~2^-8 relative) is unbiased noise
            far below the noise of a one-sample ELBO gradient.

    Returns:
        (N,) float32, nats per sequence.
    """
    n, t = targets.shape
    real = mask.bool()
    h, y = hidden[real], targets[real]  # (M, H), (M,): M real positions
    nll = []
    for i in range(0, h.size(0), block_rows):
        logits = output(h[i : i + block_rows])  # (block, V)
        if float32_softmax:
            logits = logits.float()
        with torch.autocast(logits.device.type, enabled=False):
            nll.append(F.cross_entropy(logits, y[i : i + block_rows], reduction="none").float())
    nll = torch.cat(nll)  # (M,)
    rows = torch.arange(n, device=targets.device).unsqueeze(1).expand(n, t)[real]
    return -torch.zeros(n, device=nll.device, dtype=torch.float32).index_add_(0, rows, nll)


class LSTMDecoder(nn.Module):
    """Embedding (+ z at every step) -> LSTM (state initialised from z) -> hidden states.

    ``output`` is the vocabulary projection (H -> V); it is applied by the caller, so a
    likelihood computes logits only at real positions (see :func:`sequence_log_prob`).

    Args:
        latent_dim: D; 0 makes a plain LSTM language model.
        z_init_state: c_0 = W z, h_0 = tanh(c_0) (He et al. 2019); else zeros.
        z_every_step: z is concatenated to every input embedding.
        z_skip: skip connection (Chien & Luo's flow VRAE): W z is added to every input
            embedding (after input dropout, so z is never dropped), W (E, D) learned.
        dropout_in / dropout_out: dropout on input embeddings / LSTM outputs.
        word_dropout: training-time probability of replacing an input token by ``unk_id``
            (Bowman et al. 2016); the ``<bos>`` column is never replaced.

    State: a tuple ``(h, c)`` of (N, H) tensors, batch first, so generation code can reorder it.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        hidden_dim: int,
        latent_dim: int,
        dropout_in: float = 0.5,
        dropout_out: float = 0.5,
        word_dropout: float = 0.0,
        z_init_state: bool = True,
        z_every_step: bool = True,
        pad_id: int = 0,
        unk_id: int = 3,
        z_skip: bool = False,
    ):
        super().__init__()
        self.latent_dim = latent_dim
        self.z_every_step = z_every_step and latent_dim > 0
        self.z_init_state = z_init_state and latent_dim > 0
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        in_dim = embed_dim + (latent_dim if self.z_every_step else 0)
        self.lstm = nn.LSTM(in_dim, hidden_dim, batch_first=True)
        self.init_state = nn.Linear(latent_dim, hidden_dim) if self.z_init_state else None
        self.dropout_in = nn.Dropout(dropout_in)
        self.dropout_out = nn.Dropout(dropout_out)
        self.output = nn.Linear(hidden_dim, vocab_size)
        # created last, so a decoder without it is initialised exactly as before it existed
        self.skip = nn.Linear(latent_dim, embed_dim) if z_skip and latent_dim > 0 else None
        self.word_dropout = word_dropout
        self.unk_id = unk_id
        self.hidden_dim = hidden_dim
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def initial_state(self, z: torch.Tensor | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(h_0, c_0), each (N, H), from z (N, D) or zeros."""
        if self.init_state is None or z is None:
            zeros = torch.zeros(n, self.hidden_dim, device=self.output.weight.device)
            return zeros, zeros
        c = self.init_state(z)
        return torch.tanh(c), c

    def forward(
        self,
        inputs: torch.Tensor,
        z: torch.Tensor | None,
        state: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Run the decoder over ``inputs`` (N, T) with latent z (N, D) or None.

        Returns:
            hidden (N, T, H) (after output dropout; logits are ``self.output(hidden)``) and
            the final state ((N, H), (N, H)).
        """
        n, t = inputs.shape
        if self.training and self.word_dropout > 0:
            drop = torch.rand(inputs.shape, device=inputs.device) < self.word_dropout
            drop[:, 0] = False
            inputs = inputs.masked_fill(drop, self.unk_id)
        emb = self.dropout_in(self.embed(inputs))  # (N, T, E)
        if self.skip is not None:
            emb = emb + self.skip(z).unsqueeze(1).to(emb.dtype)  # (N, 1, E) to every step
        if self.z_every_step:
            emb = torch.cat([emb, z.unsqueeze(1).expand(n, t, z.size(-1)).to(emb.dtype)], dim=-1)
        if state is None:
            state = self.initial_state(z, n)
        h0, c0 = state
        out, (h, c) = lstm_forward(
            self.lstm, emb, (h0.unsqueeze(0).contiguous(), c0.unsqueeze(0).contiguous())
        )
        return self.dropout_out(out), (h.squeeze(0), c.squeeze(0))


class BagOfWordsHead(nn.Module):
    """Bag-of-words auxiliary decoder (Zhao, Zhao & Eskenazi 2017, "Learning Discourse-level
    Diversity for Neural Dialog Models using Conditional Variational Autoencoders", the
    bag-of-word loss): f = softmax(MLP_b(z)) over the vocabulary, and
    log p(x_bag | z) = sum_t log f[x_t] over the sentence's real tokens, order ignored.

    The MLP is Linear(D, H) -> tanh -> Linear(H, V), as in their released code (H = 400 there;
    here the model's ``hidden_dim``). Its loss has no path around z, so its gradient reaches the
    latent, and through the reparameterised sample the encoder.
    """

    def __init__(self, latent_dim: int, hidden_dim: int, vocab_size: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, vocab_size)
        )

    def log_prob(self, z: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """log p_bow(x | z) per sentence.

        Args:
            z: (N, D) latent codes, or (N, *event) flattened to (N, prod(event)) (layer-wise
                latents (N, L, D): the head is built with ``latent_dim`` = L * D).
            targets: (N, T) int64 token ids.
            mask: (N, T), 1 on real tokens (EOS included), 0 on padding.

        Returns:
            (N,) float32, nats per sentence (a sum over real tokens, EOS counted, padding never).
        """
        logp = torch.log_softmax(self.net(z.flatten(1)).float(), dim=-1)  # (N, V)
        per_token = logp.gather(1, targets)  # (N, T)
        return (per_token * mask.to(per_token.dtype)).sum(-1)
