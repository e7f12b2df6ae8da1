"""Byte-exact compressors for the hostile corpus: raw deflate and zstd frames, by hand.

The corpus must be reproducible byte for byte on any machine, so it cannot
depend on the output of the system's zlib or zstd library (their encoders are
free to change between versions). Decoders are fixed by the formats, so these
small encoders write streams any inflater reads the same way:

- :func:`deflate_fixed`: RFC 1951 with the fixed Huffman code and a greedy
  LZ77 match search (good enough to compress the corpus's patterns);
- :func:`deflate_stored`: RFC 1951 stored blocks (no compression at all);
- :func:`deflate_bomb`: one dynamic-Huffman block whose every 2 bits inflate
  to 258 bytes (the format's best ratio, 1032:1);
- :func:`zstd_rle_frame`: a zstd frame of RLE blocks (4 bytes per 128 KiB),
  optionally declaring a content size.
"""

from __future__ import annotations

import struct

__all__ = ["deflate_bomb", "deflate_fixed", "deflate_stored", "zstd_rle_frame"]

_LEN_BASE = (3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67,
             83, 99, 115, 131, 163, 195, 227, 258)
_LEN_EXTRA = (0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4,
              5, 5, 5, 5, 0)
_DIST_BASE = (1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769,
              1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577)
_DIST_EXTRA = (0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10,
               11, 11, 12, 12, 13, 13)
# The order code length code lengths are sent in (RFC 1951, 3.2.7).
_CLEN_ORDER = (16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15)


class _Bits:
    """A deflate bit stream: values LSB first, Huffman codes MSB first."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.acc = 0
        self.n = 0

    def put(self, value: int, nbits: int) -> None:
        self.acc |= value << self.n
        self.n += nbits
        while self.n >= 8:
            self.out.append(self.acc & 0xFF)
            self.acc >>= 8
            self.n -= 8

    def code(self, code: int, nbits: int) -> None:
        self.put(int(f"{code:0{nbits}b}"[::-1], 2), nbits)

    def finish(self) -> bytes:
        if self.n:
            self.out.append(self.acc & 0xFF)
            self.acc = self.n = 0
        return bytes(self.out)


def _fixed_litlen(bits: _Bits, sym: int) -> None:
    if sym < 144:
        bits.code(0x30 + sym, 8)
    elif sym < 256:
        bits.code(0x190 + sym - 144, 9)
    elif sym < 280:
        bits.code(sym - 256, 7)
    else:
        bits.code(0xC0 + sym - 280, 8)


def _fixed_match(bits: _Bits, length: int, dist: int) -> None:
    li = max(i for i, b in enumerate(_LEN_BASE) if b <= length)
    if length == 258:
        li = 28
    _fixed_litlen(bits, 257 + li)
    bits.put(length - _LEN_BASE[li], _LEN_EXTRA[li])
    di = max(i for i, b in enumerate(_DIST_BASE) if b <= dist)
    bits.code(di, 5)
    bits.put(dist - _DIST_BASE[di], _DIST_EXTRA[di])


def deflate_fixed(data: bytes, *, final: bool = True) -> bytes:
    """``data`` as one fixed-Huffman deflate block (greedy matches, distances up to 4096)."""
    bits = _Bits()
    bits.put(1 if final else 0, 1)
    bits.put(1, 2)  # BTYPE 01: fixed Huffman
    heads: dict[bytes, list[int]] = {}
    i, n = 0, len(data)
    while i < n:
        best_len = best_dist = 0
        key = data[i : i + 3]
        if len(key) == 3:
            for j in reversed(heads.get(key, [])[-16:]):
                if i - j > 4096:
                    break
                k = 0
                while k < 258 and i + k < n and data[j + k] == data[i + k]:
                    k += 1
                if k > best_len:
                    best_len, best_dist = k, i - j
        if best_len >= 3:
            _fixed_match(bits, best_len, best_dist)
            step = best_len
        else:
            _fixed_litlen(bits, data[i])
            step = 1
        for p in range(i, min(i + step, n - 2)):
            heads.setdefault(data[p : p + 3], []).append(p)
        i += step
    _fixed_litlen(bits, 256)
    return bits.finish()


def deflate_stored(data: bytes) -> bytes:
    """``data`` in stored (uncompressed) deflate blocks, the last one final."""
    out = bytearray()
    chunks = [data[i : i + 65535] for i in range(0, len(data), 65535)] or [b""]
    for k, chunk in enumerate(chunks):
        out.append(1 if k == len(chunks) - 1 else 0)  # BFINAL, BTYPE 00, then byte-aligned
        out += struct.pack("<HH", len(chunk), len(chunk) ^ 0xFFFF)
        out += chunk
    return bytes(out)


def deflate_bomb(nbytes: int) -> bytes:
    """At most ``nbytes`` of raw deflate that inflate to about 1032 times as many zeros.

    One dynamic block: literal/length code {285: "0", 0: "10", 256: "11"} and a
    single one-bit distance code, so each (length 258, distance 1) match costs 2
    bits. The stream starts with one literal zero and is properly terminated.
    """
    bits = _Bits()
    bits.put(1, 1)  # BFINAL
    bits.put(2, 2)  # BTYPE 10: dynamic Huffman
    bits.put(286 - 257, 5)  # HLIT
    bits.put(1 - 1, 5)  # HDIST: one distance code
    clen = {18: 1, 1: 2, 2: 2}  # code length code: 18 -> "0", 1 -> "10", 2 -> "11"
    ncl = max(_CLEN_ORDER.index(s) for s in clen) + 1
    bits.put(ncl - 4, 4)  # HCLEN
    for sym in _CLEN_ORDER[:ncl]:
        bits.put(clen.get(sym, 0), 3)
    cl_codes = {18: (0, 1), 1: (2, 2), 2: (3, 2)}

    def cl(sym: int) -> None:
        bits.code(*cl_codes[sym])

    def zeros(count: int) -> None:
        while count:
            run = min(count, 138)
            cl(18)
            bits.put(run - 11, 7)
            count -= run

    # Literal/length lengths: 0 -> 2, 1..255 -> 0, 256 -> 2, 257..284 -> 0, 285 -> 1;
    # then the one distance code: 0 -> 1.
    cl(2)
    zeros(255)
    cl(2)
    zeros(28)
    cl(1)
    cl(1)
    bits.code(2, 2)  # literal 0
    header_bits = len(bits.out) * 8 + bits.n
    matches = (nbytes * 8 - header_bits - 2 - 2) // 2
    for _ in range(matches):
        bits.put(0, 2)  # length 258 ("0"), distance 1 ("0")
    bits.code(3, 2)  # end of block
    return bits.finish()


def zstd_rle_frame(byte: int, total: int, *, declare_size: int | None = None) -> bytes:
    """A zstd frame of RLE blocks repeating ``byte`` ``total`` times.

    ``declare_size`` puts a Frame_Content_Size in the header (which may lie).
    The window is 128 KiB, so each RLE block regenerates at most 128 KiB.
    """
    block_max = 128 * 1024
    if declare_size is None:
        head = b"\x00" + bytes([(17 - 10) << 3])  # no content size, window 2^17
    else:
        head = b"\xc0" + bytes([(17 - 10) << 3]) + struct.pack("<Q", declare_size)
    out = bytearray(struct.pack("<I", 0xFD2FB528) + head)
    left = total
    while True:
        size = min(left, block_max)
        left -= size
        last = 1 if left == 0 else 0
        out += (size << 3 | 1 << 1 | last).to_bytes(3, "little") + bytes([byte])
        if last:
            return bytes(out)
