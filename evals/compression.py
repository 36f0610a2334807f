"""Reference lines for bits per byte: what general-purpose compressors achieve on the same text.

    compression_bpb(text_bytes) -> {"gzip-9": 2.31, "xz-9": 1.87}     # bits per byte of the input

A language model's bits per byte is a code length (arithmetic coding with the model turns its summed
-log2 p into a file of that many bits, Shannon 1948), so it compares directly with the size of a
compressed file: bpb = 8 * compressed bytes / input bytes. The compressors' figures include their
container overhead (gzip: 18 bytes of header and trailer, written here with mtime 0 and no file name,
as `gzip -9 -n`; xz: the .xz stream header, index and footer), which matters only for inputs of a
few hundred bytes.

- `gzip-9`: DEFLATE (LZ77 with a 32 KiB window + Huffman), `gzip.compress(data, compresslevel=9)`.
- `xz-9`: LZMA2, `lzma.compress(data, preset=9)`: the plain preset 9 that `xz -9` uses (64 MiB
  dictionary), not `9 | PRESET_EXTREME` (`xz -9e`), which would search harder for a ~1% smaller file.
"""
from __future__ import annotations

import gzip
import lzma


def _check_data(data) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"data: expected bytes (the UTF-8 text to compress), got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("data: empty input has no bits per byte")
    return bytes(data)


def gzip_size(data: bytes) -> int:
    return len(gzip.compress(_check_data(data), compresslevel=9, mtime=0))


def xz_size(data: bytes) -> int:
    return len(lzma.compress(_check_data(data), format=lzma.FORMAT_XZ, preset=9))


def compression_bpb(data: bytes) -> dict:
    """Bits per byte of `data` under `gzip -9` and `xz -9` (see the module docstring)."""
    data = _check_data(data)
    return {"gzip-9": 8 * gzip_size(data) / len(data), "xz-9": 8 * xz_size(data) / len(data)}
