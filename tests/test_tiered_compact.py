"""The tiered format's compact token → tier index (one byte per token instead of an int64 position)."""

from __future__ import annotations

import pytest
import torch

from embfactor.errors import InvalidInputError
from embfactor.formats import FactorizedEmbedding
from embfactor.formats.base import get_format


def _tiers(seed: int = 0):
    torch.manual_seed(seed)
    return [FactorizedEmbedding(6, 8, rank=4), FactorizedEmbedding(4, 8, rank=2)]


def test_compact_index_matches_the_position_map_and_costs_one_byte_per_token():
    Tiered = get_format("tiered")
    position = torch.tensor([0, 6, 1, 2, 7, 3, 4, 8, 5, 9])  # tokens 1, 4, 7, 9 in tier 1, in id order
    full = Tiered(_tiers(), position)
    compact = Tiered(_tiers(), position, compact_index=True)
    ids = torch.arange(10)
    assert torch.equal(compact(ids), full(ids))
    assert torch.equal(compact.token_positions(), position)
    h = torch.randn(3, 8)
    assert torch.allclose(compact.project(h), full.project(h))
    assert full.num_bytes() - compact.num_bytes() == 10 * 8 - 10
    assert "tier_of" in compact.state_dict() and "position" not in compact.state_dict()
    # rebuilt from its config and loaded strictly, it maps tokens the same way
    cfg = compact.format_config()
    assert cfg["compact_index"] is True
    again = Tiered.empty(10, 8, None, **cfg)
    again.load_state_dict(compact.state_dict(), strict=True)
    assert torch.equal(again.token_positions(), position) and torch.equal(again(ids), compact(ids))
    assert "compact_index" not in full.format_config()  # the default layout is unchanged


def test_compact_index_refuses_a_permutation_out_of_id_order():
    with pytest.raises(InvalidInputError, match="increasing id order"):
        get_format("tiered")(_tiers(), torch.tensor([7, 0, 1, 2, 6, 3, 4, 8, 5, 9]), compact_index=True)


def test_maps_first_built_under_inference_mode_serve_later_calls():
    """The verification of a written model first runs it under inference_mode; the cached token maps must not be
    inference tensors (no version counter, unusable with autograd) afterwards."""
    from embfactor.formats import FactorizedEmbedding, TieredFormat
    from embfactor.layers.head import FactorizedLMHead

    fmt = TieredFormat([FactorizedEmbedding(10, 16, rank=4), FactorizedEmbedding(90, 16, rank=2)],
                       torch.arange(100), compact_index=True)
    head, h, ids = FactorizedLMHead(fmt), torch.randn(2, 16), torch.tensor([1, 50])
    with torch.inference_mode():
        first_logits, first_rows = head(h), fmt(ids)
    logits, rows = head(h), fmt(ids)
    torch.testing.assert_close(logits, first_logits.clone())
    torch.testing.assert_close(rows, first_rows.clone())
    logits.sum().backward()
    assert fmt.tiers[0].U.grad is not None


@pytest.mark.parametrize("bits,tiers", [(1, 2), (2, 3), (4, 5), (8, 3)])
def test_packed_tier_map_maps_tokens_alike_costs_its_bits_and_reloads(bits, tiers):
    from embfactor.errors import ConfigError
    from embfactor.formats.tiered import index_bits, pack_tiers, unpack_tiers

    Tiered = get_format("tiered")
    vocab = 101  # not a multiple of any packing: the last byte is partly padding
    tier_of = torch.randint(0, tiers, (vocab,), generator=torch.Generator().manual_seed(bits))
    tier_of[:tiers] = torch.arange(tiers)  # every tier holds a row
    assert torch.equal(unpack_tiers(pack_tiers(tier_of, bits), bits, vocab), tier_of)
    sizes = torch.bincount(tier_of, minlength=tiers).tolist()
    starts = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    position = torch.empty(vocab, dtype=torch.long)
    for t in range(tiers):  # each tier's tokens in id order, as the planner builds them
        ids = (tier_of == t).nonzero().squeeze(1)
        position[ids] = starts[t] + torch.arange(ids.numel())
    torch.manual_seed(0)
    children = [FactorizedEmbedding(n, 8, rank=2) for n in sizes]
    plain = Tiered(children, position)
    packed = Tiered(children, position, compact_index=True, index_bits=bits)
    ids = torch.arange(vocab)
    assert torch.equal(packed.token_positions(), position) and torch.equal(packed(ids), plain(ids))
    children_bytes = sum(c.num_bytes() for c in children)
    assert packed.num_bytes() - children_bytes == -(-vocab * bits // 8)
    again = Tiered.empty(vocab, 8, None, **packed.format_config())
    again.load_state_dict(packed.state_dict(), strict=True)
    assert torch.equal(again.token_positions(), position) and torch.equal(again(ids), packed(ids))
    assert index_bits(tiers) <= bits
    if bits > 1:
        with pytest.raises(ConfigError, match="index_bits must be one of"):
            Tiered(children, position, compact_index=True, index_bits=bits // 2 if tiers > 2 ** (bits // 2) else 3)
