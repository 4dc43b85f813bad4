"""One contract test over the model registry: every model implements the interface."""

import pytest
import torch

from textvae.models import MODELS
from textvae.objectives import ObjectiveSettings


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_contract(name, tiny_model, tiny_batch):
    model = tiny_model(name)
    b, t = tiny_batch["input_ids"].shape
    if model.has_latent:
        event = model.latent_shape  # (D,); DELLA's layer-wise latents (L, D)
        assert event[-1] == model.latent_dim
        q = model.posterior(tiny_batch)
        assert q.batch_shape == (b,) and q.event_shape == event
        p = model.prior(tiny_batch)
        assert p.batch_shape == (b,) and p.event_shape == event
        if model.conditional:  # p(z|c) depends on the batch's context
            with pytest.raises(ValueError, match="context"):
                model.prior()
            other = dict(
                tiny_batch,
                context_ids=tiny_batch["context_ids"].flip(0),
                context_mask=tiny_batch["context_mask"].flip(0),
            )
            assert not torch.allclose(model.prior(other).mean, p.mean)
        else:
            assert model.prior().batch_shape == ()
        z = q.sample((3,))
        assert z.shape == (3, b, *event)
        ll = model.log_likelihood(tiny_batch, z)
        assert ll.shape == (3, b)
        # different z give different likelihoods: z reaches the decoder
        ll2 = model.log_likelihood(tiny_batch, z + 3.0)
        assert not torch.allclose(ll, ll2)
        z_step = q.mean
    else:
        ll = model.log_likelihood(tiny_batch, None)
        assert ll.shape == (1, b)
        with pytest.raises(ValueError):
            model.posterior(tiny_batch)
        z_step = None
    assert ll.dtype == torch.float32
    assert torch.all(ll < 0)
    tokens = torch.full((b,), model.bos_id)
    state0 = model.initial_state(z_step, tiny_batch) if model.conditional else None
    logits, state = model.decode_step(z_step, tokens, state0)
    assert logits.shape == (b, model.vocab_size)
    assert all(s.shape[0] == b for s in state)  # batch-first state
    logits2, _ = model.decode_step(z_step, logits.argmax(-1), state)
    assert logits2.shape == (b, model.vocab_size)
    out = model(tiny_batch, ObjectiveSettings(beta=0.5))
    assert out["loss"].ndim == 0 and out["rec"].shape == (b,) and out["kl"].shape == (b,)


@pytest.mark.parametrize("name", sorted(MODELS))
@torch.no_grad()
def test_decode_step_matches_teacher_forcing(name, tiny_model, tiny_batch):
    """Summing decode_step log-probs over a sentence gives log_likelihood: one decoder."""
    model = tiny_model(name)
    ids = tiny_batch["input_ids"][:1]
    batch = {k: v[:1] for k, v in tiny_batch.items()}
    n = int(batch["attention_mask"].sum())
    z = model.posterior(batch).mean if model.has_latent else None
    state = model.initial_state(z, batch) if model.conditional else None
    total, prev = 0.0, torch.tensor([model.bos_id])
    for t in range(n):
        logits, state = model.decode_step(z, prev, state)
        total += float(torch.log_softmax(logits, -1)[0, ids[0, t]])
        prev = ids[:, t]
    ll = model.log_likelihood(batch, z.unsqueeze(0) if z is not None else None)
    assert float(ll[0, 0]) == pytest.approx(total, abs=1e-4)
