"""Bit packing of integer codes.

- `pack_trits`: ternary codes {-1, 0, +1} in base 3, five trits per byte
  (3**5 = 243 <= 256): 1.6 bits per weight; log2(3) = 1.585 is the limit.
  byte = t0 + 3*t1 + 9*t2 + 27*t3 + 81*t4 with t = code + 1, flattened in row-major order.
- `pack_int4`: codes in [-8, 7] as two nibbles per byte, low nibble first.
- `pack_int2`: codes in [-2, 1] as four 2-bit fields per byte (code + 2), first code in the
  lowest bits: 2 bits per weight.
"""
from __future__ import annotations

import numpy as np

TRITS_PER_BYTE = 5
_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)
MAX_TRIT_BYTE = 242  # 3**5 - 1


def _lut() -> np.ndarray:
    b = np.arange(MAX_TRIT_BYTE + 1, dtype=np.int16)
    return np.stack([(b // int(p)) % 3 for p in _POW3], axis=1).astype(np.int8) - 1


_TRIT_LUT = _lut()  # byte -> its five codes


def packed_trits_size(n: int) -> int:
    return -(-n // TRITS_PER_BYTE)


def pack_trits(codes) -> np.ndarray:
    """Any-shaped array of {-1, 0, 1} -> uint8 array of ceil(n / 5) bytes."""
    flat = np.asarray(codes).reshape(-1)
    if flat.size and (flat.min() < -1 or flat.max() > 1):
        raise ValueError("ternary codes must be in {-1, 0, 1}")
    t = (flat.astype(np.int8) + 1).astype(np.uint8)
    pad = (-t.size) % TRITS_PER_BYTE
    if pad:
        t = np.concatenate([t, np.zeros(pad, np.uint8)])
    t = t.reshape(-1, TRITS_PER_BYTE)
    return t[:, 0] + 3 * t[:, 1] + 9 * t[:, 2] + 27 * t[:, 3] + 81 * t[:, 4]


def unpack_trits(packed, n: int) -> np.ndarray:
    """uint8 bytes -> the first n ternary codes (int8). Rejects bytes > 242 and wrong sizes."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size != packed_trits_size(n):
        raise ValueError(f"{packed.size} bytes cannot hold exactly {n} trits (expected {packed_trits_size(n)})")
    if packed.size and packed.max() > MAX_TRIT_BYTE:
        raise ValueError("byte value above 242 is not a valid 5-trit group")
    return _TRIT_LUT[packed].reshape(-1)[:n]


def packed_int4_size(n: int) -> int:
    return -(-n // 2)


def pack_int4(codes) -> np.ndarray:
    flat = np.asarray(codes).reshape(-1)
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError("int4 codes must be in [-8, 7]")
    u = (flat.astype(np.int16) + 8).astype(np.uint8)
    if u.size % 2:
        u = np.concatenate([u, np.zeros(1, np.uint8)])
    return u[0::2] | (u[1::2] << 4)


def unpack_int4(packed, n: int) -> np.ndarray:
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size != packed_int4_size(n):
        raise ValueError(f"{packed.size} bytes cannot hold exactly {n} int4 values")
    out = np.empty(packed.size * 2, dtype=np.int8)
    out[0::2] = (packed & 0x0F).astype(np.int8) - 8
    out[1::2] = (packed >> 4).astype(np.int8) - 8
    return out[:n]


def packed_int2_size(n: int) -> int:
    return -(-n // 4)


def pack_int2(codes) -> np.ndarray:
    flat = np.asarray(codes).reshape(-1)
    if flat.size and (flat.min() < -2 or flat.max() > 1):
        raise ValueError("int2 codes must be in [-2, 1]")
    u = (flat.astype(np.int16) + 2).astype(np.uint8)
    u = np.concatenate([u, np.zeros((-u.size) % 4, np.uint8)]).reshape(-1, 4)
    return u[:, 0] | (u[:, 1] << 2) | (u[:, 2] << 4) | (u[:, 3] << 6)


def unpack_int2(packed, n: int) -> np.ndarray:
    """uint8 bytes -> the first n int2 codes (int8). Every byte is valid: only the size is checked."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size != packed_int2_size(n):
        raise ValueError(f"{packed.size} bytes cannot hold exactly {n} int2 values")
    fields = np.stack([(packed >> shift) & 3 for shift in (0, 2, 4, 6)], axis=1)
    return (fields.astype(np.int8) - 2).reshape(-1)[:n]
