"""Packing layouts: exact round trips and the documented bit/nibble orders (pure torch)."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from qpasses.kernels import packing as P


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), k=st.integers(1, 80), seed=st.integers(0, 2 ** 16))
def test_int8_pack_pads_and_round_trips(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    p = P.pack_int8_weight(w)
    assert p.dtype == torch.int8 and p.is_contiguous()
    assert p.shape[0] == n and p.shape[1] % P.INT8_K_ALIGN == 0 and p.shape[1] >= k
    assert torch.equal(P.unpack_int8_weight(p, k), w)
    assert not p[:, k:].any()


def test_int8_conv_pack_is_ohwi_bytes():
    w = torch.randint(-128, 128, (5, 3, 2, 4), dtype=torch.int8)
    p = P.pack_int8_conv_weight(w)
    assert p.shape == w.shape and torch.equal(p, w)
    assert p.is_contiguous(memory_format=torch.channels_last)
    flat = torch.as_strided(p, (5, 2 * 4 * 3), (2 * 4 * 3, 1))      # the bytes as [Cout, kh*kw*cin]
    assert torch.equal(flat, w.permute(0, 2, 3, 1).reshape(5, -1))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), k=st.integers(1, 70), signed=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_int4_round_trip(n, k, signed, seed):
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-8, 8) if signed else (0, 16)
    v = torch.randint(lo, hi, (n, k), generator=g, dtype=torch.int8)
    p = P.pack_int4(v, signed=signed)
    assert p.dtype == torch.uint8 and p.shape == (n, (k + 1) // 2)
    assert torch.equal(P.unpack_int4(p, k, signed=signed), v)


def test_int4_nibble_order():
    v = torch.tensor([[1, 2, 3]], dtype=torch.int8)
    p = P.pack_int4(v, signed=False)
    assert p.tolist() == [[1 | (2 << 4), 3]]            # low nibble = even k; odd K: high nibble 0
    assert P.pack_int4(torch.tensor([[-8, 7]]), signed=True).tolist() == [[0 | (15 << 4)]]


def test_int4_rejects_out_of_range_and_bad_group():
    with pytest.raises(ValueError):
        P.pack_int4(torch.tensor([[8]]), signed=True)
    with pytest.raises(ValueError):
        P.pack_int4(torch.tensor([[-1]]), signed=False)
    with pytest.raises(ValueError):
        P.pack_int4(torch.tensor([[1, 2]]), group_size=48)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_quantize_int4_reconstructs(symmetric, group):
    torch.manual_seed(0)
    w = torch.randn(5, 150)
    p, s, z = P.quantize_int4(w, group, symmetric=symmetric)
    G = (150 + group - 1) // group
    assert s.shape == (5, G) and (z is None) == symmetric
    q = P.unpack_int4(p, 150, signed=False).float()
    gi = torch.arange(150) // group
    deq = (q - (z[:, gi] if z is not None else 8.0)) * s[:, gi]
    assert (deq - w).abs().max() <= s.max() * 0.5 + 1e-6


@settings(max_examples=40, deadline=None)
@given(lead=st.integers(1, 5), k=st.integers(1, 100), seed=st.integers(0, 2 ** 16))
def test_bits_round_trip(lead, k, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 2, (lead, k), generator=g) * 2 - 1
    p = P.pack_bits(s)
    assert p.dtype == torch.int32 and p.shape == (lead, (k + 31) // 32)
    assert torch.equal(P.unpack_bits(p, k), s.to(torch.int8))


def test_bit_order_and_sign_convention():
    s = torch.ones(40)
    s[0] = -1
    s[31] = -1
    s[33] = -1
    p = P.pack_bits(s)
    assert p.tolist() == [1 - 2 ** 31, 2]                  # bit 0 and bit 31 of word 0, bit 1 of word 1
    assert P.pack_bits(torch.tensor([0.0, -0.5, 3.0])).tolist() == [2]   # zero counts as +1
