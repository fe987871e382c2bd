import numpy as np
import pytest

from slimdet.export.huffman import (
    MAX_CODE_BITS,
    canonical_codes,
    code_lengths,
    coded_bytes,
    decode_stream,
    encode_stream,
)

RNG = np.random.default_rng(0)
STREAMS = {
    "empty": np.zeros(0, dtype=np.int64),
    "one-symbol": np.array([7]),
    "one-distinct-repeated": np.full(1000, 3),
    "two-symbols": RNG.integers(0, 2, 999),
    "uniform-16": RNG.integers(0, 16, 20_000),
    "geometric": np.minimum(RNG.geometric(0.2, 50_000) - 1, 256),
    "zipf-rare-symbols": np.minimum(RNG.zipf(1.3, 100_000), 32_000),
    "wide-alphabet": RNG.integers(0, 1 << 15, 5_000),
}


@pytest.mark.parametrize("symbols", STREAMS.values(), ids=STREAMS.keys())
def test_round_trip_is_exact_and_size_is_predicted(symbols):
    data = encode_stream(symbols)
    decoded, end = decode_stream(data)
    assert end == len(data)
    assert np.array_equal(decoded, symbols) and decoded.dtype == np.int64
    counts = np.bincount(symbols) if symbols.size else np.zeros(0, dtype=np.int64)
    assert coded_bytes(counts) == len(data)


def test_streams_concatenate_and_decode_from_an_offset():
    a, b = STREAMS["geometric"][:777], STREAMS["uniform-16"][:333]
    data = b"head" + encode_stream(a) + encode_stream(b)
    got_a, offset = decode_stream(data, 4)
    got_b, end = decode_stream(data, offset)
    assert np.array_equal(got_a, a) and np.array_equal(got_b, b) and end == len(data)


def test_lengths_are_optimal_on_a_textbook_example():
    counts = np.array([45, 13, 12, 16, 9, 5])  # CLRS 16.3: a..f, optimal cost 224
    lengths = code_lengths(counts)
    assert lengths.tolist() == [1, 3, 3, 3, 4, 4]
    assert int((counts * lengths).sum()) == 224


def test_canonical_codes_follow_rfc1951():
    lengths = np.array([3, 3, 3, 3, 3, 2, 4, 4])  # RFC 1951 3.2.2's example, symbols A..H
    codes = canonical_codes(lengths)
    assert [format(int(c), f"0{int(n)}b") for c, n in zip(codes, lengths, strict=True)] == [
        "010", "011", "100", "101", "110", "00", "1110", "1111"]  # fmt: skip


def test_average_length_within_one_bit_of_the_entropy():
    symbols = STREAMS["geometric"]
    counts = np.bincount(symbols)
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * np.log2(p)).sum())
    mean_len = float((counts * code_lengths(counts)).sum() / counts.sum())
    assert entropy <= mean_len < entropy + 1


def test_lengths_are_capped_and_still_decodable():
    counts = 2 ** np.arange(25)  # the optimal tree is a 24-deep chain
    assert code_lengths(counts, max_bits=30).max() == 24
    lengths = code_lengths(counts)
    assert lengths.max() == MAX_CODE_BITS
    assert sum(2.0 ** -int(n) for n in lengths) == 1.0  # still a complete prefix code
    symbols = np.repeat(np.arange(len(counts)), np.minimum(counts, 50))
    assert np.array_equal(decode_stream(encode_stream(symbols))[0], symbols)


def test_bad_input_and_corrupt_streams_raise():
    with pytest.raises(ValueError, match="symbols must be in"):
        encode_stream(np.array([-1, 2]))
    data = encode_stream(STREAMS["uniform-16"])
    with pytest.raises(ValueError, match="truncated in the payload"):
        decode_stream(data[:-10])
    with pytest.raises(ValueError, match="truncated in the header"):
        decode_stream(data[:3])
    bad_lengths = bytearray(data)
    bad_lengths[7] = 0x11  # symbols 0 and 1 both get length 1: the rest no longer fits a prefix code
    with pytest.raises(ValueError, match="complete prefix code"):
        decode_stream(bytes(bad_lengths))
    bad_mode = bytearray(data)
    bad_mode[0] = 9
    with pytest.raises(ValueError, match="unknown mode 9"):
        decode_stream(bytes(bad_mode))
