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
* inputs: the count depends on where the epoch boundaries fall in the demand stream (im2col addresses,
  line by line, in the order the dataflow's folds and systolic skew demand them), which no window formula
  captures for strided convs and small buffers. Closed forms cover the easy cases (all distinct inputs
  fit one epoch: each is fetched once; no input demanded twice in a pass, as in 1x1 convs: every access
  is a fetch); otherwise the stream is generated and the epoch rule replayed on it, exactly, in NumPy
  chunks with a repeating-pass shortcut (:func:`_epoch_fetches`). Layers whose stream exceeds
  ``MAX_SCAN`` accesses are extrapolated from the replayed part.
* outputs: every ofmap word the array writes goes to DRAM (ws/is: once per row fold, os: once).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from slimdet.hw.layers import GemmLayer
from slimdet.hw.spec import Dataflow, SystolicSpec

#: demand-stream accesses replayed per layer in SCALE-Sim compatibility mode (the rest is extrapolated)
MAX_SCAN = 2_000_000


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
    """Conv geometry per layer as SCALE-Sim sees one group of one image: input cropped to the rows/columns
    read (padding included, ``(out - 1) * stride + kernel``), kernel, stride, channels per group, output
    size, batch. A linear/matmul layer is a 1x1 conv over ``m`` pixels of ``k`` channels."""
    cols: dict[str, list[int]] = {key: [] for key in ("c", "hp", "wp", "kh", "kw", "sh", "sw", "ho", "wo", "batch")}
    for g in gemm:
        if g.op in ("conv", "dwconv", "gconv") and g.in_chw[0] > 0:
            (kh, kw), (sh, sw), (ho, wo) = g.kernel, g.stride, g.out_hw
            vals = (g.in_chw[0] // g.groups, (ho - 1) * sh + kh, (wo - 1) * sw + kw, kh, kw, sh, sw, ho, wo, g.batch)
        else:
            vals = (g.k, g.m, 1, 1, 1, 1, 1, g.m, 1, 1)
        for key, v in zip(cols, vals, strict=True):
            cols[key].append(v)
    return {key: np.asarray(v, dtype=np.int64) for key, v in cols.items()}


def scalesim_dram_words(geo: dict[str, np.ndarray], *, m: np.ndarray, k: np.ndarray, n: np.ndarray, spec: SystolicSpec,
                        max_scan: int = MAX_SCAN) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """(ifmap, filter, ofmap) DRAM words per group, SCALE-Sim v3 CALC-mode convention (see module doc).

    ``max_scan`` caps the demand-stream accesses replayed per layer (larger layers are extrapolated).
    """
    rows, cols = spec.rows, spec.cols
    e_if = 50 * (spec.ifmap_sram_bytes // spec.word_bytes // 100)
    e_f = 50 * (spec.filter_sram_bytes // spec.word_bytes // 100)
    df = spec.dataflow
    if df == Dataflow.WS:
        col_folds = np.ceil(n / cols)
        filt = k * n
        ofmap = np.ceil(k / rows) * m * n
    elif df == Dataflow.OS:
        col_folds = np.ceil(n / cols)
        filt = _repeated_blocks(k, n, cols, np.ceil(m / rows), e_f)
        ofmap = m * n
    else:
        col_folds = np.ones_like(m)  # the weights stream; the inputs are read in one pass
        filt = np.where(k * n < e_f, k * n, np.ceil(m / cols) * k * n)
        ofmap = np.ceil(k / rows) * m * n
    span_h = _span(geo["ho"], geo["kh"], geo["sh"])
    span_w = _span(geo["wo"], geo["kw"], geo["sw"])
    distinct = (geo["batch"] * span_h * span_w * geo["c"]).astype(np.float64)  # input words the layer reads
    accesses = geo["batch"] * geo["ho"] * geo["wo"] * geo["kh"] * geo["kw"] * geo["c"] * col_folds  # demanded
    # fewer distinct words than an epoch: each is fetched once; no word demanded twice in a pass (1x1 convs,
    # stride >= kernel): every epoch window holds distinct words, so every access is a fetch
    fits = (distinct < e_if) | (e_if == 0)  # (a buffer under 100 words never closes a set, hence no epoch)
    ifmap = np.where(fits, distinct, accesses).astype(np.float64)
    replay = ~fits & (distinct * col_folds < accesses)
    for i in np.flatnonzero(replay):
        g = {key: int(v[i]) for key, v in geo.items()}
        ifmap[i] = _epoch_fetches(df, g, rows, cols, int(col_folds.flat[i]), e_if, max_scan)
    passes = k / np.maximum(geo["kh"] * geo["kw"] * geo["c"], 1)  # bit-serial slices re-read the inputs
    return ifmap.reshape(m.shape) * passes, filt, ofmap


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


def _span(count: np.ndarray, extent: np.ndarray, stride: np.ndarray) -> np.ndarray:
    """Distinct values of ``a * stride + e`` for ``count`` values of ``a`` and ``extent`` values of ``e``."""
    return np.where(extent >= stride, (count - 1) * stride + extent, count * extent)


def _addresses(g: dict[str, int], pixels: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """SCALE-Sim's ifmap address of im2col entry (output pixel, column), broadcast; < 0 outside the matrix."""
    # SCALE-Sim v3 compute/operand_matrix.py: input row-major, channels fastest (HWC); im2col column =
    # (kernel row, kernel column, channel), channel fastest; each further image is one more HWC block
    c, wo, kw = g["c"], g["wo"], g["kw"]
    m, k = g["batch"] * g["ho"] * wo, g["kh"] * kw * c
    outside = -(g["batch"] * g["hp"] * g["wp"] * c + 1)  # keeps an invalid entry negative after the sum
    image, rest = np.divmod(pixels, g["ho"] * wo)
    oy, ox = np.divmod(rest, wo)
    base = np.where(pixels < m, image * (g["hp"] * g["wp"] * c) + (oy * g["sh"] * g["wp"] + ox * g["sw"]) * c, outside)
    r, rest = np.divmod(columns, kw * c)
    s, ch = np.divmod(rest, c)
    return base + np.where(columns < k, (r * g["wp"] + s) * c + ch, outside)


def _demand_stream(df: Dataflow, g: dict[str, int], rows: int, cols: int, limit: int) -> np.ndarray:
    """The ifmap addresses one pass of the layer demands, in SCALE-Sim's order, or a prefix of >= ``limit``."""
    # SCALE-Sim v3 compute/systolic_compute_{ws,os,is}.py create_ifmap_demand_mat, read line by line:
    # ws: per fold of `rows` im2col columns, all pixels, skewed (line t holds pixel t - j in lane j);
    # os: per fold of `rows` pixels, all im2col columns, skewed (line t holds column t - j in lane j);
    # is: per fold of `cols` pixels (outer) and `rows` columns (inner), columns last-first, one per line.
    m, k = g["batch"] * g["ho"] * g["wo"], g["kh"] * g["kw"] * g["c"]
    lane = np.arange(rows)
    if df == Dataflow.IS:
        k_folds = -(-k // rows)
        p_folds = min(-(-m // cols), -(-limit // (cols * k)))
        pixels = np.arange(p_folds)[:, None, None, None] * cols + np.arange(cols)
        columns = np.arange(k_folds)[None, :, None, None] * rows + lane[::-1, None]
        out = _addresses(g, pixels, columns).ravel()
        return out[out >= 0]
    if df == Dataflow.WS:  # folds over im2col columns, lines over pixels
        long, short = m, k
    else:  # os: folds over pixels, lines over im2col columns
        long, short = k, m
    width = min(rows, short)  # lanes in use
    folds = min(-(-short // rows), -(-limit // (long * width)))
    lines = min(long, -(-limit // width) + rows)  # a prefix of the lines of a single fold is exact
    fold_lane = np.arange(folds)[:, None, None] * rows + lane  # (fold, 1, lane)
    along = np.arange(lines)[None, :, None]
    tile = _addresses(g, along, fold_lane) if df == Dataflow.WS else _addresses(g, fold_lane, along)
    skewed = np.full((folds, lines + rows - 1, rows), -1, dtype=np.int64)
    skewed[:, along[0] + lane, lane] = tile  # systolic skew: lane j runs j cycles late
    out = skewed[:, :lines].ravel() if lines < long else skewed.ravel()
    return out[out >= 0]


def _epoch_fetches(df: Dataflow, g: dict[str, int], rows: int, cols: int, passes: int, epoch: int,
                   max_scan: int) -> float:  # fmt: skip
    """Replays SCALE-Sim's ifmap read buffer on the demand stream (``passes`` repeats of one pass) and
    returns its DRAM fetches: an address is fetched unless it was already fetched in the current epoch,
    and an epoch closes after ``epoch`` fetches (read_buffer_estimate_bw: 50 sets of 1% of the buffer).

    Chunks of the stream are checked at once: an access is a fetch if it is the first of its address in
    the chunk and the address is not marked as fetched in this epoch. What follows an epoch start depends
    only on its offset in the pass, so once an epoch starts at an offset where one started in an earlier
    pass, the passes in between repeat to the end and are counted without replaying them. After ``max_scan``
    replayed accesses, the fetch rate so far is extrapolated to the rest of the stream.
    """
    pass_len = g["batch"] * g["ho"] * g["wo"] * g["kh"] * g["kw"] * g["c"]
    total_len = pass_len * passes
    stream = _demand_stream(df, g, rows, cols, min(total_len, max_scan))
    plen = len(stream)
    end = total_len if plen == pass_len else plen  # a prefix of a pass does not repeat
    space = int(stream.max()) + 1
    unset = np.iinfo(np.int32).max
    seen = np.full(space, -1, dtype=np.int32)  # the epoch in which each address was last fetched
    first = np.full(space, unset, dtype=np.int32)  # scratch: first index of each address in a chunk
    index = np.arange(plen, dtype=np.int32)
    pos = work = epoch_id = fetched = boundary = boundary_fetched = 0  # boundary: where the last epoch closed
    need, chunk, starts = epoch, 4 * epoch, {}  # starts: pass offset of each epoch start -> (pass, fetched)
    while pos < end and work < max_scan:
        offset = pos % plen
        n = min(chunk, plen - offset, end - pos)
        x, i = stream[offset : offset + n], index[:n]
        np.minimum.at(first, x, i)
        new = np.flatnonzero((first[x] == i) & (seen[x] != epoch_id))  # first sight in this epoch
        first[x] = unset
        work += n
        if len(new) < need:
            seen[x] = epoch_id
            fetched, need, pos = fetched + len(new), need - len(new), pos + n
            continue
        step = int(new[need - 1]) + 1
        chunk = max(int(1.1 * (pos + step - boundary)), 256)
        fetched += need
        pos = boundary = pos + step
        epoch_id, need = epoch_id + 1, epoch
        pass_id, offset = divmod(boundary, plen)
        if offset not in starts:
            starts[offset] = (pass_id, fetched)
        elif starts[offset][0] < pass_id:  # a cycle of passes: skip its whole repeats
            cycle, gain = pass_id - starts[offset][0], fetched - starts[offset][1]
            repeats = (end - boundary) // (cycle * plen)
            pos = boundary = boundary + repeats * cycle * plen
            fetched += repeats * gain
            starts.clear()
        boundary_fetched = fetched
    if pos >= end and end == total_len:
        return float(fetched)
    if boundary == 0:
        return fetched * total_len / pos
    return boundary_fetched * total_len / boundary
