"""Compression reference lines against direct gzip / lzma calls."""
import gzip
import lzma

import pytest

from evals.compression import compression_bpb

TEXT = ("def f(x):\n    return x * 2\n" * 40 + "".join(chr(0x41 + i % 26) for i in range(997))).encode()


def test_matches_direct_compression():
    got = compression_bpb(TEXT)
    assert set(got) == {"gzip-9", "xz-9"}
    assert got["gzip-9"] == 8 * len(gzip.compress(TEXT, compresslevel=9, mtime=0)) / len(TEXT)
    assert got["xz-9"] == 8 * len(lzma.compress(TEXT, preset=9)) / len(TEXT)
    assert gzip.decompress(gzip.compress(TEXT, compresslevel=9, mtime=0)) == TEXT


def test_repetitive_text_compresses_below_random_bytes():
    import os
    noise = os.urandom(4096)
    rep = b"abc" * 4096
    assert compression_bpb(noise)["gzip-9"] > 8.0   # incompressible: container overhead on top of 8 bits
    assert compression_bpb(rep)["gzip-9"] < 0.1 and compression_bpb(rep)["xz-9"] < 0.1


@pytest.mark.parametrize("bad,match", [(b"", "data: empty input"), ("text", "data: expected bytes")])
def test_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        compression_bpb(bad)
