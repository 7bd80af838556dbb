"""Bit packing: base-3 trits (5 per byte), int4 nibbles, int2 fields (4 per byte) and id-set bitmaps."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tritpress.exporters.packing import (MAX_TRIT_BYTE, is_idset, pack_idset, pack_int2, pack_int4, pack_trits,
                                        pack_uint, packed_idset_size, packed_int2_size, packed_int4_size,
                                        packed_trits_size, packed_uint_size, uint_bits, unpack_idset, unpack_int2,
                                        unpack_int4, unpack_trits, unpack_uint)
from tritpress.compressor.layers import WeightFormat
from tritpress.exporters.packed import decode_tensor, encode_tensor

trit_arrays = hnp.arrays(np.int8, st.integers(0, 2000), elements=st.integers(-1, 1))
int4_arrays = hnp.arrays(np.int8, st.integers(0, 2000), elements=st.integers(-8, 7))
int2_arrays = hnp.arrays(np.int8, st.integers(0, 2000), elements=st.integers(-2, 1))


def ceil_div(a, b):
    return (a + b - 1) // b


# ------------------------------------------------------------------ trits: known vectors

@pytest.mark.parametrize("codes,expected", [
    # t = code + 1; byte = t0 + 3 t1 + 9 t2 + 27 t3 + 81 t4
    ([-1, 0, 1, 1, -1], [75]),           # t = 0,1,2,2,0 -> 0 + 3 + 18 + 54 + 0 = 75
    ([-1, -1, -1, -1, -1], [0]),         # all t = 0
    ([0, 0, 0, 0, 0], [121]),            # 1 + 3 + 9 + 27 + 81 = 121
    ([1, 1, 1, 1, 1], [242]),            # 2 * 121 = 242, the largest valid byte
    ([1, 0, 0, 0, 0], [122]),            # t = 2,1,1,1,1 -> 2 + 3 + 9 + 27 + 81 = 122
    ([0, 0, 0, 0, 1], [202]),            # t = 1,1,1,1,2 -> 1 + 3 + 9 + 27 + 162 = 202
])
def test_pack_trits_known_bytes(codes, expected):
    packed = pack_trits(np.array(codes, np.int8))
    assert packed.dtype == np.uint8
    assert packed.tolist() == expected
    assert unpack_trits(packed, len(codes)).tolist() == codes


def test_pack_trits_two_groups_and_padding():
    # first group [1,-1,0,0,1]: t = 2,0,1,1,2 -> 2 + 0 + 9 + 27 + 162 = 200
    # second group [0, 1] + 3 pad trits: t = 1,2 -> 1 + 6 = 7 (+ padding, whatever it is, must decode away)
    codes = np.array([1, -1, 0, 0, 1, 0, 1], np.int8)
    packed = pack_trits(codes)
    assert packed.size == 2
    assert packed[0] == 200
    assert packed[1] % 9 == 7          # the two real trits of the last byte
    assert unpack_trits(packed, 7).tolist() == codes.tolist()


def test_pack_trits_is_row_major_for_any_shape():
    codes = np.array([[-1, 0, 1], [1, -1, 0]], np.int8)
    assert pack_trits(codes).tolist() == pack_trits(codes.reshape(-1)).tolist()
    # flattened [-1,0,1,1,-1,0]: first byte = 75 as above
    assert pack_trits(codes)[0] == 75
    assert unpack_trits(pack_trits(codes), 6).reshape(2, 3).tolist() == codes.tolist()


def test_pack_trits_empty():
    assert pack_trits(np.zeros(0, np.int8)).size == 0
    assert unpack_trits(np.zeros(0, np.uint8), 0).size == 0


@pytest.mark.parametrize("bad", [[2], [-2], [0, 1, 5], [-128]])
def test_pack_trits_rejects_non_ternary(bad):
    with pytest.raises(ValueError):
        pack_trits(np.array(bad, np.int8))


# ------------------------------------------------------------------ trits: properties

@settings(max_examples=300, deadline=None, database=None)
@given(trit_arrays)
def test_trits_round_trip_property(codes):
    packed = pack_trits(codes)
    assert packed.dtype == np.uint8
    assert packed.size == ceil_div(codes.size, 5) == packed_trits_size(codes.size)
    assert packed.size == 0 or int(packed.max()) <= 242
    out = unpack_trits(packed, codes.size)
    assert out.dtype == np.int8
    assert np.array_equal(out, codes)


def test_trits_round_trip_every_length_0_to_2000():
    rng = np.random.default_rng(0)
    for n in range(2001):
        codes = rng.integers(-1, 2, n).astype(np.int8)
        packed = pack_trits(codes)
        assert packed.size == ceil_div(n, 5), n
        assert packed.size == 0 or packed.max() <= MAX_TRIT_BYTE == 242
        assert np.array_equal(unpack_trits(packed, n), codes), n


def test_every_valid_byte_decodes_and_reencodes():
    allbytes = np.arange(243, dtype=np.uint8)
    codes = unpack_trits(allbytes, 243 * 5)
    assert set(np.unique(codes).tolist()) == {-1, 0, 1}
    assert np.array_equal(pack_trits(codes), allbytes)


def test_unpacking_a_read_only_buffer_is_silent_and_exact():
    """Bytes straight from a file (np.frombuffer: read-only) unpack without torch's non-writable warning."""
    import warnings
    codes = np.array([1, 0, -1, 1, 1, 0, 1, -1], np.int8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for pack, unpack, c in ((pack_trits, unpack_trits, codes), (pack_int4, unpack_int4, codes * 7),
                                (pack_int2, unpack_int2, np.clip(codes, -2, 1))):
            ro = np.frombuffer(pack(c).tobytes(), np.uint8)
            assert not ro.flags.writeable
            np.testing.assert_array_equal(unpack(ro, len(c)), c)


@pytest.mark.parametrize("bad", [243, 244, 250, 255])
def test_unpack_trits_rejects_invalid_bytes(bad):
    packed = np.array([75, bad, 0], np.uint8)
    with pytest.raises(ValueError):
        unpack_trits(packed, 15)


@pytest.mark.parametrize("nbytes,n", [(1, 6), (2, 5), (0, 1), (1, 0), (3, 10), (2, 11)])
def test_unpack_trits_rejects_wrong_sizes(nbytes, n):
    with pytest.raises(ValueError):
        unpack_trits(np.zeros(nbytes, np.uint8), n)


# ------------------------------------------------------------------ int4

@pytest.mark.parametrize("codes,expected", [
    ([-8, 7], [240]),     # u = 0, 15 -> 0 | 15 << 4 = 240
    ([-1, 2], [167]),     # u = 7, 10 -> 7 | 160 = 167
    ([3], [11]),          # u = 11, odd length: one byte
    ([0, 0, -8], [136, 0]),  # u = 8, 8 -> 8 | 128 = 136; then u = 0 -> 0
])
def test_pack_int4_known_bytes(codes, expected):
    packed = pack_int4(np.array(codes, np.int8))
    assert packed.dtype == np.uint8
    assert packed.tolist() == expected
    assert unpack_int4(packed, len(codes)).tolist() == codes


@settings(max_examples=300, deadline=None, database=None)
@given(int4_arrays)
def test_int4_round_trip_property(codes):
    packed = pack_int4(codes)
    assert packed.dtype == np.uint8
    assert packed.size == ceil_div(codes.size, 2) == packed_int4_size(codes.size)
    assert np.array_equal(unpack_int4(packed, codes.size), codes)


@pytest.mark.parametrize("bad", [[8], [-9], [0, 100], [127]])
def test_pack_int4_rejects_out_of_range(bad):
    with pytest.raises(ValueError):
        pack_int4(np.array(bad, np.int16))


@pytest.mark.parametrize("nbytes,n", [(1, 3), (2, 2), (0, 1), (1, 0)])
def test_unpack_int4_rejects_wrong_sizes(nbytes, n):
    with pytest.raises(ValueError):
        unpack_int4(np.zeros(nbytes, np.uint8), n)


# ------------------------------------------------------------------ int2

@pytest.mark.parametrize("codes,expected", [
    ([-2, -1, 0, 1], [228]),   # u = 0,1,2,3 -> 0 | 1<<2 | 2<<4 | 3<<6 = 4 + 32 + 192 = 228
    ([1, 1, 1, 1], [255]),     # all u = 3
    ([-2, -2, -2, -2], [0]),   # all u = 0
    ([0], [2]),                # u = 2 in the lowest bits, the padding fields are 0
    ([1, -2, 0, -1, 0], [3 | 0 | 2 << 4 | 1 << 6, 2]),  # 5 codes: two bytes
])
def test_pack_int2_known_bytes(codes, expected):
    packed = pack_int2(np.array(codes, np.int8))
    assert packed.dtype == np.uint8
    assert packed.tolist() == expected
    assert unpack_int2(packed, len(codes)).tolist() == codes


@settings(max_examples=300, deadline=None, database=None)
@given(int2_arrays)
def test_int2_round_trip_property(codes):
    packed = pack_int2(codes)
    assert packed.dtype == np.uint8
    assert packed.size == ceil_div(codes.size, 4) == packed_int2_size(codes.size)
    assert np.array_equal(unpack_int2(packed, codes.size), codes)


@settings(max_examples=100, deadline=None, database=None)
@given(hnp.arrays(np.uint8, st.integers(0, 500)))
def test_every_int2_byte_decodes_and_repacks_to_itself(packed):
    # 4 fields of 2 bits use all 256 byte values: any byte is four valid codes
    codes = unpack_int2(packed, 4 * packed.size)
    assert codes.min(initial=-2) >= -2 and codes.max(initial=1) <= 1
    assert np.array_equal(pack_int2(codes), packed)


@pytest.mark.parametrize("bad", [[2], [-3], [0, 100], [127]])
def test_pack_int2_rejects_out_of_range(bad):
    with pytest.raises(ValueError):
        pack_int2(np.array(bad, np.int16))


@pytest.mark.parametrize("nbytes,n", [(1, 5), (2, 4), (0, 1), (1, 0)])
def test_unpack_int2_rejects_wrong_sizes(nbytes, n):
    with pytest.raises(ValueError):
        unpack_int2(np.zeros(nbytes, np.uint8), n)


# ------------------------------------------------------------------ id sets (bitmaps)

def test_pack_idset_known_bytes():
    packed, universe = pack_idset(np.array([0, 3, 8, 9], np.int32))
    assert universe == 10 and packed.tolist() == [0b00001001, 0b00000011]  # bit i of byte i // 8
    assert unpack_idset(packed, 4, 10).tolist() == [0, 3, 8, 9]


@settings(max_examples=200, deadline=None)
@given(st.sets(st.integers(0, 5000), min_size=1, max_size=600))
def test_idset_round_trip_property(members):
    ids = np.array(sorted(members), np.int32)
    packed, universe = pack_idset(ids)
    assert packed.dtype == np.uint8 and packed.size == packed_idset_size(universe) == -(-(ids[-1] + 1) // 8)
    assert np.array_equal(unpack_idset(packed, ids.size, universe), ids)


@pytest.mark.parametrize("bad", [[], [3, 3], [5, 2], [-1, 4], [[1, 2]], [0.5, 1.0], np.array([200, 100], np.uint8)])
def test_pack_idset_rejects_what_is_not_a_set(bad):
    assert not is_idset(np.array(bad))
    with pytest.raises(ValueError):
        pack_idset(np.array(bad))


def test_unpack_idset_rejects_a_bitmap_that_disagrees_with_its_metadata():
    packed, universe = pack_idset(np.array([1, 4, 7]))
    with pytest.raises(ValueError, match="holds 3 ids"):
        unpack_idset(packed, 4, universe)       # one id missing
    with pytest.raises(ValueError, match="not the bitmap"):
        unpack_idset(packed, 3, 20)             # wrong size
    with pytest.raises(ValueError, match="up to 7"):
        unpack_idset(packed, 3, 7)              # universe shorter than the largest member


# ------------------------------------------------------------------ narrow non-negative integers

def test_pack_uint_known_bytes():
    # 3-bit fields 5, 1, 7: bits 101 100 111 (least significant first) -> 0b11_001_101, 0b1
    packed = pack_uint(np.array([5, 1, 7]), 3)
    assert packed.tolist() == [0b11001101, 0b1] and uint_bits([5, 1, 7]) == 3
    assert unpack_uint(packed, 3, 3).tolist() == [5, 1, 7]


@settings(max_examples=300, deadline=None, database=None)
@given(st.integers(1, 40).flatmap(lambda bits: st.tuples(
    st.just(bits), hnp.arrays(np.int64, st.integers(0, 300), elements=st.integers(0, 2 ** bits - 1)))))
def test_uint_round_trip_property(bits_values):
    bits, values = bits_values
    packed = pack_uint(values, bits)
    assert packed.dtype == np.uint8
    assert packed.size == packed_uint_size(values.size, bits) == ceil_div(values.size * bits, 8)
    assert np.array_equal(unpack_uint(packed, values.size, bits), values)
    assert values.size == 0 or uint_bits(values) <= bits


@pytest.mark.parametrize("values,bits", [([4], 2), ([-1], 8), ([0.5], 4), ([1], 0), ([1], 63)])
def test_pack_uint_rejects_what_does_not_fit(values, bits):
    with pytest.raises(ValueError):
        pack_uint(np.array(values), bits)


@pytest.mark.parametrize("nbytes,n,bits", [(1, 2, 5), (3, 2, 5), (0, 1, 1), (1, 1, 0)])
def test_unpack_uint_rejects_wrong_sizes(nbytes, n, bits):
    with pytest.raises(ValueError):
        unpack_uint(np.zeros(nbytes, np.uint8), n, bits)


# ------------------------------------------------------------------ which encoding a state-dict tensor gets

int_tensors = st.sampled_from([np.int8, np.int16, np.int32, np.int64, np.uint8]).flatmap(
    lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=3, max_side=9)))


@settings(max_examples=300, deadline=None, database=None)
@given(int_tensors)
def test_every_integer_tensor_round_trips_in_its_smallest_encoding(values):
    t = torch.from_numpy(values.copy())
    stored, encoding, fields = encode_tensor("buf", t, {}, {})
    entry = {"encoding": encoding, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), **fields}
    back = decode_tensor("buf", stored, entry)
    assert back.dtype == t.dtype and torch.equal(back, t)
    assert stored.numel() * stored.element_size() <= t.numel() * t.element_size()
    if encoding == "uintbits":
        assert int(values.min()) >= 0 and fields["bits"] == uint_bits(values)


def test_integer_encodings_are_chosen_by_size():
    def encoding(t):
        return encode_tensor("buf", t, {}, {})[1:]

    assert encoding(torch.zeros(1, 512, dtype=torch.int64)) == ("uintbits", {"bits": 1})
    assert encoding(torch.arange(0, 30000, 3)) == ("bitset", {"universe": 29998})  # an id set: the bitmap
    assert encoding(torch.tensor([[5, 9000], [3, 7]], dtype=torch.int16)) == ("uintbits", {"bits": 14})
    assert encoding(torch.tensor([-1, 4], dtype=torch.int16)) == ("raw", {})          # negative: as it is
    assert encoding(torch.tensor([2 ** 62, 1])) == ("raw", {})                         # needs all 64 bits
    assert encoding(torch.tensor([200, 100], dtype=torch.uint8)) == ("raw", {})        # 8 bits of 8
    assert encoding(torch.tensor([True, False])) == ("raw", {})
    codes = torch.tensor([[1, 2], [3, 4]], dtype=torch.int8)   # int8 codes stay a byte whatever their values
    assert encode_tensor("w.codes", codes, {"w.codes": WeightFormat("int8")}, {})[1] == "raw"
