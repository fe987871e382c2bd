"""DRAM traffic of a GEMM layer on a systolic array with double-buffered ifmap/filter/ofmap SRAMs.

Two models, both per group (a grouped layer runs its groups one after another):

``tiled_dram_bytes`` (slimdet's estimate). Half of each buffer is the working set, the other half
prefetches (double buffering). With input bytes ``I``, weight bytes ``W`` and output bytes ``O``:

* if the weights fit (``W <= filter/2``) or the inputs fit (``I <= ifmap/2``), the other operand streams
  through once: ``I + W + O`` (compulsory traffic);
* otherwise the GEMM is blocked and the cheaper loop order is taken: weight tiles outer (inputs
  re-read once per weight tile, ``ceil(W / (filter/2)) * I + W``) or input tiles outer
  (``I + ceil(I / (ifmap/2)) * W``);
* outputs are written once, unless the weights of one array column block over the whole reduction
  (``k x cols``) do not fit the filter buffer *and* the partial sums of that block (``m x cols``) do
  not fit the ofmap buffer: then the reduction is split into ``s`` parts and partial sums make
  ``2 (s - 1)`` extra DRAM trips (``(2s - 1) * O``).

Every term is a multiple >= 1 of the compulsory traffic, so the estimate never falls below it and
grows as soon as an operand outgrows its buffer.

``scalesim_dram_words`` (compatibility with SCALE-Sim v3, ``InterfaceBandwidth: CALC``). SCALE-Sim's
read buffer (memory/read_buffer_estimate_bw.py) splits a buffer of ``B`` words into 100 sets; the
addresses the array demands, in demand order, are fetched from DRAM unless already fetched since the
last *epoch* start, and an epoch ends after ``E = 50 * floor(B / 100)`` fetches (half the buffer),
when the fetched sets are retired. Its counts follow from that rule:

* weights: ws reads each weight once (``k n``); is re-reads all ``k n`` weights per column fold,
  which hits only while they fit one epoch (``k n`` if ``k n < E`` else ``ceil(m/cols) k n``); os
  repeats each ``k x cols`` weight block ``ceil(m/rows)`` times in a row, which costs the block once
  plus the part fetched before an epoch boundary that falls inside it (computed exactly, block by block);
* inputs: the whole input if it fits one epoch; otherwise the demand stream (im2col addresses in
  the dataflow's loop order) is cut into epochs of ``E`` distinct addresses, and the count is
  ``E x accesses / accesses-per-epoch``, with the accesses per epoch solved from a closed-form
  footprint (distinct input pixels of a window of the loop nest, with stride and kernel overlap);
* outputs: every ofmap word the array writes goes to DRAM (ws/is: once per row fold, os: once).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from slimdet.hw.layers import GemmLayer
from slimdet.hw.spec import Dataflow, SystolicSpec


def tiled_dram_bytes(*, m: np.ndarray, k: np.ndarray, n: np.ndarray, groups: np.ndarray, input_bytes: np.ndarray,
                     weight_bytes: np.ndarray, output_bytes: np.ndarray,
                     spec: SystolicSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """(ifmap read, filter read, ofmap write) DRAM bytes of every layer (all groups), tiled model.

    ``k``/``n`` are the packed GEMM sizes in 8-bit words; the ``*_bytes`` are the layers' totals.
    """
    inp, wgt, out = input_bytes / groups, weight_bytes / groups, output_bytes / groups
    cap_i, cap_f, cap_o = spec.ifmap_sram_bytes / 2, spec.filter_sram_bytes / 2, spec.ofmap_sram_bytes / 2
    fits = (wgt <= cap_f) | (inp <= cap_i)
    weights_outer = inp * np.ceil(wgt / cap_f) + wgt  # inputs re-read per weight tile
    inputs_outer = inp + wgt * np.ceil(inp / cap_i)  # weights re-read per input tile
    use_weights_outer = weights_outer <= inputs_outer
    in_reads = np.where(fits | ~use_weights_outer, inp, weights_outer - wgt)
    w_reads = np.where(fits | use_weights_outer, wgt, inputs_outer - inp)
    block_cols = np.minimum(n, spec.cols)
    splits = np.ceil(k * block_cols * spec.word_bytes / cap_f)  # reduction parts of one column block
    psum_spill = (splits > 1) & (m * block_cols * (out / np.maximum(m * n, 1)) > cap_o)
    out_writes = out * np.where(psum_spill, 2 * splits - 1, 1)
    return groups * in_reads, groups * w_reads, groups * out_writes


def layer_geometry(gemm: Sequence[GemmLayer]) -> dict[str, np.ndarray]:
    """Conv geometry per layer as SCALE-Sim sees one group: input cropped to the rows/columns read
    (padding included, ``(out - 1) * stride + kernel``), kernel, stride, channels per group, output size.
    A linear/matmul layer is a 1x1 conv over ``m`` pixels of ``k`` channels."""
    cols: dict[str, list[int]] = {key: [] for key in ("c", "hp", "wp", "kh", "kw", "sh", "sw", "ho", "wo")}
    for g in gemm:
        if g.op in ("conv", "dwconv", "gconv") and g.in_chw[0] > 0:
            (kh, kw), (sh, sw), (ho, wo) = g.kernel, g.stride, g.out_hw
            vals = (g.in_chw[0] // g.groups, (ho - 1) * sh + kh, (wo - 1) * sw + kw, kh, kw, sh, sw, ho * g.batch, wo)
        else:
            vals = (g.k, g.m, 1, 1, 1, 1, 1, g.m, 1)
        for key, v in zip(cols, vals, strict=True):
            cols[key].append(v)
    return {key: np.asarray(v, dtype=np.float64) for key, v in cols.items()}


def scalesim_dram_words(geo: dict[str, np.ndarray], *, m: np.ndarray, k: np.ndarray, n: np.ndarray,
                        spec: SystolicSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """(ifmap, filter, ofmap) DRAM words per group, SCALE-Sim v3 CALC-mode convention (see module doc)."""
    rows, cols = spec.rows, spec.cols
    e_if = 50 * (spec.ifmap_sram_bytes // spec.word_bytes // 100)
    e_f = 50 * (spec.filter_sram_bytes // spec.word_bytes // 100)
    df = spec.dataflow
    if df == Dataflow.WS:
        row_folds, col_folds = np.ceil(k / rows), np.ceil(n / cols)
        filt = k * n
        ofmap = row_folds * m * n
    elif df == Dataflow.OS:
        row_folds, col_folds = np.ceil(m / rows), np.ceil(n / cols)
        filt = _repeated_blocks(k, n, cols, row_folds, e_f)
        ofmap = m * n
    else:
        row_folds, col_folds = np.ceil(k / rows), np.ceil(m / cols)
        filt = np.where(k * n < e_f, k * n, col_folds * k * n)
        ofmap = row_folds * m * n
    passes = k / np.maximum(geo["kh"] * geo["kw"] * geo["c"], 1)  # bit-serial slices re-read the inputs
    ifmap = np.array([_ifmap_words(df, {key: v[i] for key, v in geo.items()}, rows, cols, n[i], e_if)
                      for i in range(len(m))]) * passes  # fmt: skip
    return ifmap.reshape(m.shape), filt, ofmap


def _repeated_blocks(k: np.ndarray, n: np.ndarray, cols: int, repeats: np.ndarray, epoch: int) -> np.ndarray:
    """Fetches of os weight blocks (``k x cols``, each demanded ``repeats`` times in a row) under epochs of
    ``epoch`` fetches: a block that fits an epoch costs itself plus the part fetched before an epoch
    boundary inside its first pass; a larger one is fetched on every repeat."""
    total = np.zeros_like(k)
    fetched = np.zeros_like(k)  # fetches so far (position in the epoch sequence)
    blocks = np.ceil(n / cols)
    for b in range(int(blocks.max(initial=0))):
        live = b < blocks
        size = k * np.minimum(cols, n - b * cols)
        into_epoch = np.mod(fetched, epoch)
        crossing = np.where(into_epoch + size > epoch, epoch - into_epoch, 0.0)
        cost = np.where(size >= epoch, repeats * size, size + np.where(repeats > 1, crossing, 0.0))
        cost = np.where(live, cost, 0.0)
        total += cost
        fetched += cost
    return total


def _ifmap_words(df: Dataflow, g: dict[str, float], rows: int, cols: int, n: float, epoch: int) -> float:
    """SCALE-Sim's ifmap DRAM words of one layer (one group) under epochs of ``epoch`` distinct addresses.

    The demand stream is a loop nest: ws streams all pixels through each fold of ``rows`` im2col
    columns; os (is) streams all im2col columns through each fold of ``rows`` (``cols``) pixels; ws and
    os repeat the whole pass once per column fold. The distinct words of a window of that nest (its
    footprint) are counted in closed form; an epoch is the window whose footprint reaches ``epoch``,
    the stream holds ``accesses / window`` of them, and the last, partial one costs its own footprint.
    """
    c, ho, wo, kh, kw, sh, sw = g["c"], g["ho"], g["wo"], g["kh"], g["kw"], g["sh"], g["sw"]
    m, k = ho * wo, kh * kw * c

    def footprint(pixels: float, window: float) -> float:
        """Distinct input words of ``pixels`` consecutive output pixels (raster order) x ``window``
        consecutive im2col columns (channel fastest, then kernel column, then kernel row)."""
        p_rows, p_cols = (1.0, pixels) if pixels <= wo else (pixels / wo, wo)
        if window <= c:
            w_rows, w_cols, w_ch = 1.0, 1.0, window
        elif window <= kw * c:
            w_rows, w_cols, w_ch = 1.0, window / c, c
        else:
            w_rows, w_cols, w_ch = window / (kw * c), kw, c
        return _span(p_rows, w_rows, sh) * _span(p_cols, w_cols, sw) * w_ch

    if df == Dataflow.WS:
        block = min(rows, k)  # im2col columns of one fold
        per_pass, passes = m * k, np.ceil(n / cols)

        def window_footprint(w: float) -> float:
            if w <= m * block:
                return footprint(max(w / block, 1.0), block)
            return footprint(m, min(k, w / m))
    else:
        block = min(rows if df == Dataflow.OS else cols, m)  # pixels of one fold
        per_pass, passes = m * k, (np.ceil(n / cols) if df == Dataflow.OS else 1.0)

        def window_footprint(w: float) -> float:
            if w <= block * k:
                return footprint(block, max(w / block, 1.0))
            return footprint(min(m, w / k), k)

    distinct = footprint(m, k)
    if distinct < epoch:
        return distinct
    lo, hi = 1.0, per_pass  # accesses per epoch: window_footprint(hi) == epoch
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if window_footprint(mid) < epoch else (lo, mid)
    total = passes * per_pass
    full = np.floor(total / hi)
    return epoch * full + window_footprint(total - full * hi) if total > full * hi else epoch * full


def _span(count: float, extent: float, stride: float) -> float:
    """Distinct values of ``a * stride + e`` for ``count`` values of ``a`` and ``extent`` values of ``e``."""
    return (count - 1) * stride + extent if extent >= stride else count * extent
