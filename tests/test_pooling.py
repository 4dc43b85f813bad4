"""Masked pooling: a sentence's summary does not depend on its batch's padding."""

import pytest
import torch

from textvae.encoders import POOLINGS, LSTMEncoder, masked_pool


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_encoder_pooling_is_invariant_to_extra_padding(pooling, bidirectional):
    torch.manual_seed(0)
    enc = LSTMEncoder(20, 8, 6, pooling, bidirectional, pad_id=0).eval()
    ids = torch.tensor([[5, 6, 7, 2, 0], [4, 9, 11, 12, 2]])
    mask = (ids != 0).long()
    extra = torch.zeros(2, 6, dtype=torch.long)
    a = enc(ids, mask)
    b = enc(torch.cat([ids, extra], 1), torch.cat([mask, extra], 1))
    assert torch.allclose(a, b, atol=1e-6)
    alone = enc(ids[:1, :4], mask[:1, :4])  # the short sentence without any padding
    assert torch.allclose(a[:1], alone, atol=1e-6)


def test_masked_pool_known_values():
    states = torch.tensor([[[1.0], [3.0], [100.0]], [[2.0], [-1.0], [4.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert masked_pool(states, mask, "mean").flatten().tolist() == pytest.approx([2.0, 5.0 / 3.0])
    assert masked_pool(states, mask, "max").flatten().tolist() == [3.0, 4.0]
    assert masked_pool(states, mask, "last").flatten().tolist() == [3.0, 4.0]
    with pytest.raises(ValueError, match="unknown pooling"):
        masked_pool(states, mask, "median")
