import pytest
import torch

from slimdet.compress.sparse_storage import nm_groups, nm_ungroup, sparse_storage_bytes


def _half_zero_2_4():
    """4 x 8 weight, 2 zeros in every group of 4: 16 nonzeros, 8 groups."""
    w = torch.arange(1, 33, dtype=torch.float32).reshape(4, 8)
    w[:, [0, 2, 5, 7]] = 0
    return w


def test_2_4_storage_is_kept_values_plus_3_bits_per_group():
    s = sparse_storage_bytes(_half_zero_2_4(), n=2, m=4)
    assert s.format == "n:m"
    assert s.dense_bytes == 32 * 4
    assert s.values_bytes == 16 * 4
    assert s.index_bytes == 3  # 8 groups x ceil(log2(C(4, 2))) = 8 x 3 bits = 24 bits
    assert s.sparse_bytes == 67
    assert sparse_storage_bytes(_half_zero_2_4(), bits=8, n=2, m=4).sparse_bytes == 16 + 3


def test_n_m_counts_kept_values_even_when_they_are_zero_and_rounds_metadata_up():
    w = torch.zeros(1, 8)
    s = sparse_storage_bytes(w, n=1, m=4)  # 2 groups, 1 kept value each, ceil(log2 4) = 2 bits per group
    assert (s.values_bytes, s.index_bytes) == (2 * 4, 1)


def test_unstructured_picks_bitmap_at_half_sparsity():
    s = sparse_storage_bytes(_half_zero_2_4())
    # bitmap: 32 bits + 16 values x 4 B = 4 + 64; CSR: 64 + 16 x 2 B + 5 row pointers x 4 B = 116
    assert (s.format, s.values_bytes, s.index_bytes, s.sparse_bytes) == ("bitmap", 64, 4, 68)


def test_unstructured_picks_csr_when_very_sparse():
    w = torch.zeros(4, 1000)
    w[torch.arange(4), torch.tensor([3, 500, 999, 0])] = 1.0
    s = sparse_storage_bytes(w)
    # CSR: 4 values x 4 B + 4 x 16-bit columns + 5 x 32-bit row pointers = 16 + 8 + 20; bitmap: 500 + 16
    assert (s.format, s.sparse_bytes) == ("csr", 44)


def test_csr_uses_32_bit_columns_for_very_wide_rows():
    w = torch.zeros(1, (1 << 16) + 1)
    w[0, 0] = 1.0
    assert sparse_storage_bytes(w).sparse_bytes == 4 + 4 + 2 * 4


def test_dense_when_sparse_formats_cost_more():
    s = sparse_storage_bytes(torch.ones(4, 8), bits=4)
    assert (s.format, s.sparse_bytes, s.index_bytes) == ("dense", 16, 0)


def test_conv_groups_round_trip_along_input_channels():
    w = torch.randn(3, 8, 2, 5)
    groups = nm_groups(w, 4)
    assert groups.shape == (3 * 2 * 5 * 2, 4)
    assert torch.equal(groups[0], w[0, :4, 0, 0])
    assert torch.equal(nm_ungroup(groups, w.shape), w)


@pytest.mark.parametrize(
    ("weight", "kw", "match"),
    [
        (torch.ones(2, 8), {"n": 2, "m": 4}, "3 nonzeros|4 nonzeros"),
        (torch.ones(2, 6), {"n": 2, "m": 4}, "multiple of m=4"),
        (torch.ones(2, 8), {"n": 2}, "both n and m"),
        (torch.ones(2, 8), {"n": 4, "m": 4}, "1 <= n < m"),
        (torch.ones(2, 8), {"bits": 0}, "bits must be >= 1"),
    ],
    ids=["too-dense", "indivisible", "n-only", "n=m", "bits"],
)
def test_bad_inputs_raise(weight, kw, match):
    with pytest.raises(ValueError, match=match):
        sparse_storage_bytes(weight, **kw)
