"""Bytes needed to store a sparse weight, index cost included.

A weight is stored dense, or as its nonzero values plus an index saying where they are. Which is
cheaper depends on the sparsity and the value width: at 32-bit values a bitmap index pays off above
~3% zeros, at 4-bit values only above ~25%. N:M weights (n kept of every m consecutive weights along
the input dimension) store the n values of each group and a small per-group pattern index.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

#: CSR column indices take 16 bits while a row has at most this many columns, 32 bits beyond.
MAX_COLS_16BIT = 1 << 16
#: CSR row pointers (offsets into the value array) are 32-bit.
ROW_POINTER_BITS = 32


@dataclass(frozen=True)
class SparseStorage:
    """Storage of one weight: ``format`` is "dense", "bitmap", "csr" or "n:m"."""

    format: str
    dense_bytes: int
    values_bytes: int
    index_bytes: int

    @property
    def sparse_bytes(self) -> int:
        return self.values_bytes + self.index_bytes

    def to_dict(self) -> dict[str, int | str]:
        return {**asdict(self), "sparse_bytes": self.sparse_bytes}


def sparse_storage_bytes(
    weight: Tensor, *, bits: int = 32, n: int | None = None, m: int | None = None
) -> SparseStorage:
    """Bytes to store ``weight`` with ``bits``-bit values in the cheapest format, index included.

    Unstructured (``n``, ``m`` not given): the cheapest of
      - dense: every value;
      - bitmap: 1 bit per weight, then the nonzero values;
      - CSR over rows = output channels (columns = the rest, flattened): the nonzero values, a
        16-bit column index per nonzero (32-bit when a row has more than 65,536 columns) and a
        32-bit row pointer per row plus one.
    N:M (``n`` and ``m`` given): the n kept values of every group of m consecutive weights along the
    input dimension (zeros among them included) plus ceil(log2(C(m, n))) bits per group naming the
    kept positions (3 bits for 2:4). Each part is rounded up to whole bytes.

    Raises:
        ValueError: bad ``bits``/``n``/``m``, or a weight that does not follow the n:m pattern.
    """
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    numel = weight.numel()
    dense = _bytes(numel * bits)
    if (n is None) != (m is None):
        raise ValueError(f"give both n and m for n:m storage, or neither (got n={n}, m={m})")
    if n is not None and m is not None:
        if not 1 <= n < m:
            raise ValueError(f"n:m storage needs 1 <= n < m, got n={n}, m={m}")
        groups = nm_groups(weight.detach(), m)
        most = int((groups != 0).sum(dim=1).max()) if groups.numel() else 0
        if most > n:
            raise ValueError(f"weight of shape {tuple(weight.shape)} has {most} nonzeros in a group of {m}; n:m "
                             f"storage allows at most n={n}")  # fmt: skip
        # Which n of m positions are kept: one of C(m, n) patterns, ceil(log2 C(m, n)) bits per group.
        # NVIDIA's sparse tensor cores store a 2-bit position per kept value instead, 4 bits per 2:4
        # group (A100 whitepaper, 2020; Mishra et al., arXiv:2104.08378): 1 bit per group more than here.
        pattern_bits = math.ceil(math.log2(math.comb(m, n)))
        return SparseStorage("n:m", dense, _bytes(groups.shape[0] * n * bits), _bytes(groups.shape[0] * pattern_bits))
    nnz = int(torch.count_nonzero(weight))
    values = _bytes(nnz * bits)
    rows = weight.shape[0] if weight.ndim else 1
    cols = numel // max(rows, 1)
    col_bits = 16 if cols <= MAX_COLS_16BIT else 32
    options = [
        SparseStorage("dense", dense, dense, 0),
        SparseStorage("bitmap", dense, values, _bytes(numel)),
        SparseStorage("csr", dense, values, _bytes(nnz * col_bits + (rows + 1) * ROW_POINTER_BITS)),
    ]
    return min(options, key=lambda s: s.sparse_bytes)  # ties: the first (dense, then bitmap)


def nm_groups(weight: Tensor, m: int) -> Tensor:
    """``weight`` as rows of m consecutive weights along the input dimension (G x m).

    A conv weight ``out x in x kh x kw`` is grouped along ``in`` at each (out, kh, kw), the
    reduction dimension of its implicit GEMM with channels innermost, as NVIDIA's 2:4 format does.
    """
    if weight.ndim not in (2, 4) or weight.shape[1] % m:
        raise ValueError(f"n:m groups run along the input dimension: a 2-D or 4-D weight whose dim 1 is a "
                         f"multiple of m={m} is needed, got shape {tuple(weight.shape)}")  # fmt: skip
    if weight.ndim == 4:
        weight = weight.permute(0, 2, 3, 1)
    return weight.reshape(-1, m)


def nm_ungroup(groups: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inverse of ``nm_groups``: back to a weight of ``shape``."""
    if len(shape) == 4:
        out, c_in, kh, kw = shape
        return groups.reshape(out, kh, kw, c_in).permute(0, 3, 1, 2).contiguous()
    return groups.reshape(shape)


def _bytes(num_bits: int) -> int:
    return (num_bits + 7) // 8
