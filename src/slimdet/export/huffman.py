"""Canonical Huffman coding of integer symbol streams, for the deep-compression archive.

A stream is self-describing: a mode byte (empty, one repeated symbol, or Huffman), the symbol count,
and for Huffman the code length of every symbol of the alphabet (4 bits each) followed by the
packed bits. The codes are canonical (Schwartz & Kallick, 1964; as in DEFLATE, RFC 1951 3.2.2), so
the lengths alone define them. Lengths are capped at ``MAX_CODE_BITS`` by halving the symbol counts
until the Huffman tree is shallow enough, a slightly suboptimal but simple way to bound the decode
table at 2^15 entries.

Encoding is vectorised with NumPy (one pass per code-bit position). Decoding is table driven: the
code at every bit offset is looked up at once in a ``2^max_len`` table; only the walk from one code
to the next (offset += length) is a Python loop.
"""

from __future__ import annotations

import heapq
import struct

import numpy as np

__all__ = ["MAX_CODE_BITS", "canonical_codes", "code_lengths", "coded_bytes", "decode_stream", "encode_stream"]

#: longest code; 4 bits store a length, and the decode table has at most 2^15 entries
MAX_CODE_BITS = 15
#: symbols are stored as 16-bit numbers
MAX_ALPHABET = 1 << 15

_EMPTY, _SINGLE, _HUFFMAN = 0, 1, 2
_HEAD = struct.Struct("<BI")  # mode, symbol count


def code_lengths(counts: np.ndarray, *, max_bits: int = MAX_CODE_BITS) -> np.ndarray:
    """Huffman code length of each symbol (0 for symbols with count 0), at most ``max_bits``.

    A single used symbol gets length 1. When the optimal tree is deeper than ``max_bits`` the counts
    are halved (rounding up, so no used symbol drops out) and the tree rebuilt.
    """
    counts = np.asarray(counts, dtype=np.int64)
    used = np.flatnonzero(counts > 0)
    if len(used) > 1 << max_bits:
        raise ValueError(f"{len(used)} symbols do not fit codes of at most {max_bits} bits")
    lengths = np.zeros(len(counts), dtype=np.uint8)
    if len(used) == 1:
        lengths[used] = 1
    elif len(used) > 1:
        weights = counts[used]
        depth = _tree_depths(weights)
        while depth.max() > max_bits:
            weights = (weights + 1) // 2
            depth = _tree_depths(weights)
        lengths[used] = depth
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code of each symbol: codes of one length are consecutive, in symbol order, and
    shorter codes come first (RFC 1951 3.2.2)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(len(lengths), dtype=np.int64)
    code, prev = 0, 0
    for sym in np.lexsort((np.arange(len(lengths)), lengths)):
        length = int(lengths[sym])
        if length == 0:
            continue
        code <<= length - prev
        codes[sym], code, prev = code, code + 1, length
    return codes


def coded_bytes(counts: np.ndarray) -> int:
    """Size of ``encode_stream`` for symbols with these counts (alphabet = ``len(counts)``)."""
    counts = np.asarray(counts, dtype=np.int64)
    used = np.flatnonzero(counts)
    if len(used) == 0:
        return _HEAD.size
    if len(used) == 1:
        return _HEAD.size + 2
    alphabet = int(used[-1]) + 1
    payload_bits = int((counts * code_lengths(counts)).sum())
    return _HEAD.size + 2 + (alphabet + 1) // 2 + 4 + (payload_bits + 7) // 8


def encode_stream(symbols: np.ndarray) -> bytes:
    """Encode non-negative integer symbols (< 2^15) as one self-describing stream."""
    symbols = np.asarray(symbols).reshape(-1).astype(np.int64)
    if symbols.size and (symbols.min() < 0 or symbols.max() >= MAX_ALPHABET):
        raise ValueError(f"symbols must be in [0, {MAX_ALPHABET}), got [{symbols.min()}, {symbols.max()}]")
    counts = np.bincount(symbols) if symbols.size else np.zeros(0, dtype=np.int64)
    used = np.flatnonzero(counts)
    if len(used) == 0:
        return _HEAD.pack(_EMPTY, 0)
    if len(used) == 1:
        return _HEAD.pack(_SINGLE, symbols.size) + struct.pack("<H", int(used[0]))
    lengths = code_lengths(counts)
    payload = _pack_codes(symbols, lengths, canonical_codes(lengths))
    alphabet = len(counts)
    nibbles = np.zeros(alphabet + alphabet % 2, dtype=np.uint8)
    nibbles[:alphabet] = lengths
    table = (nibbles[0::2] << 4 | nibbles[1::2]).astype(np.uint8).tobytes()
    return b"".join([_HEAD.pack(_HUFFMAN, symbols.size), struct.pack("<H", alphabet), table,
                     struct.pack("<I", len(payload)), payload])  # fmt: skip


def decode_stream(buf: bytes | memoryview, offset: int = 0) -> tuple[np.ndarray, int]:
    """Decode the stream starting at ``offset``; returns the symbols (int64) and the offset after it.

    Raises:
        ValueError: the bytes are not a valid stream (truncated, impossible code lengths, bits that
            are no code, or a payload shorter than the symbol count needs).
    """
    buf = memoryview(buf)
    mode, count = _unpack(_HEAD, buf, offset, "header")
    offset += _HEAD.size
    if mode == _EMPTY:
        if count:
            raise ValueError(f"corrupt Huffman stream: empty stream with {count} symbols")
        return np.zeros(0, dtype=np.int64), offset
    if mode == _SINGLE:
        (symbol,) = _unpack(struct.Struct("<H"), buf, offset, "symbol")
        return np.full(count, symbol, dtype=np.int64), offset + 2
    if mode != _HUFFMAN:
        raise ValueError(f"corrupt Huffman stream: unknown mode {mode}")
    (alphabet,) = _unpack(struct.Struct("<H"), buf, offset, "alphabet size")
    offset += 2
    table_len = (alphabet + 1) // 2
    packed = np.frombuffer(_take(buf, offset, table_len, "code lengths"), dtype=np.uint8)
    lengths = np.stack([packed >> 4, packed & 15], axis=1).reshape(-1)[:alphabet]
    offset += table_len
    (payload_len,) = _unpack(struct.Struct("<I"), buf, offset, "payload size")
    offset += 4
    payload = _take(buf, offset, payload_len, "payload")
    return _unpack_codes(payload, count, lengths), offset + payload_len


def _tree_depths(weights: np.ndarray) -> np.ndarray:
    """Leaf depths of the Huffman tree of ``weights`` (>= 2 leaves); ties broken by node number."""
    n = len(weights)
    heap = [(int(w), i) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    parent = [0] * (2 * n - 1)
    node = n
    while len(heap) > 1:
        w1, a = heapq.heappop(heap)
        w2, b = heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (w1 + w2, node))
        node += 1
    depth = [0] * (2 * n - 1)
    for i in range(2 * n - 3, -1, -1):  # the root is node 2n-2; parents have larger numbers
        depth[i] = depth[parent[i]] + 1
    return np.array(depth[:n], dtype=np.int64)


def _pack_codes(symbols: np.ndarray, lengths: np.ndarray, codes: np.ndarray) -> bytes:
    sym_len = lengths[symbols].astype(np.int64)
    sym_code = codes[symbols]
    starts = np.cumsum(sym_len) - sym_len
    bits = np.zeros(int(starts[-1] + sym_len[-1]), dtype=np.uint8)
    for j in range(int(sym_len.max())):  # bit j of every code (most significant first)
        has = sym_len > j
        bits[starts[has] + j] = (sym_code[has] >> (sym_len[has] - 1 - j)) & 1
    return np.packbits(bits).tobytes()


def _unpack_codes(payload: bytes | memoryview, count: int, lengths: np.ndarray) -> np.ndarray:
    lengths = lengths.astype(np.int64)
    used = np.flatnonzero(lengths)
    max_len = int(lengths.max()) if len(used) else 0
    if len(used) < 2 or int((1 << (max_len - lengths[used])).sum()) != 1 << max_len:
        raise ValueError("corrupt Huffman stream: code lengths do not form a complete prefix code")
    # canonical codes in (length, symbol) order fill the table in consecutive ranges
    order = used[np.lexsort((used, lengths[used]))]
    span = 1 << (max_len - lengths[order])
    table_sym = np.repeat(order, span)
    table_len = np.repeat(lengths[order], span)
    data = np.frombuffer(bytes(payload) + b"\0\0\0", dtype=np.uint8).astype(np.int32)
    nbits = 8 * len(payload)
    # the max_len bits starting at every bit offset, read from the 24-bit big-endian word there
    word = data[:-2] << 16 | data[1:-1] << 8 | data[2:]
    shift = np.tile(np.arange(24 - max_len, 16 - max_len, -1, dtype=np.int32), len(payload))
    window = (np.repeat(word[: len(payload)], 8) >> shift) & ((1 << max_len) - 1)
    step = table_len[window].tolist()
    starts = [0] * count
    pos = 0
    try:
        for i in range(count):
            starts[i] = pos
            pos += step[pos]
    except IndexError:
        raise ValueError(f"corrupt Huffman stream: payload of {len(payload)} bytes ends before "
                         f"{count} symbols") from None  # fmt: skip
    if pos > nbits:
        raise ValueError(f"corrupt Huffman stream: payload of {len(payload)} bytes ends before {count} symbols")
    return table_sym[window[np.asarray(starts, dtype=np.int64)]].astype(np.int64)


def _take(buf: memoryview, offset: int, size: int, what: str) -> memoryview:
    if offset + size > len(buf):
        raise ValueError(f"corrupt Huffman stream: truncated in the {what} ({len(buf) - offset} of {size} bytes)")
    return buf[offset : offset + size]


def _unpack(fmt: struct.Struct, buf: memoryview, offset: int, what: str) -> tuple[int, ...]:
    return fmt.unpack(_take(buf, offset, fmt.size, what))
