"""The GPU CRC-32's decomposition (parts, stripes, pieces, zero padding removed by x^-8z), checked on the CPU."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cupycodec.kernels import crc32 as k


def test_constants():
    c = k.consts()
    assert c.dtype.name == "uint32" and c.size == 2176
    assert int(c[1]) == zlib.crc32(b"\x01") ^ zlib.crc32(b"\x00")  # T0 is the byte table (linear part)
    assert k.mulmod(k.X_INV, 0x40000000) == k.ONE
    for e in (0, 1, 7, 8, 1000, 2**35 + 3):
        assert k.mulmod(k.xpow(e), k.xpow_inv(e)) == k.ONE
    assert k.xpow(8 * 3) == k.mulmod(k.xpow(8), k.xpow(16))


@pytest.mark.parametrize("n", [0, 1, 3, 4, 15, 16, 17, 63, 64, 65, 255, 256, 257, 1023, 1024, 1025, 3000])
@pytest.mark.parametrize("part", [64, 256])
def test_decomposition_edges(n, part):
    data = bytes((i * 131 + 7) % 251 for i in range(n))
    assert k.crc32_reference(data, piece=16, threads=4, part=part) == zlib.crc32(data)


@given(st.binary(max_size=2500), st.sampled_from([32, 64, 128]), st.sampled_from([16, 32]))
def test_decomposition_matches_zlib(data, part, piece):
    assert k.crc32_reference(data, piece=piece, threads=2, part=max(part, 2 * piece)) == zlib.crc32(data)


def test_more_than_32_parts_uses_lane_folding():
    data = bytes(range(256)) * 20  # 5120 bytes in 64-byte parts: 80 parts, r = 4
    assert k.crc32_reference(data, piece=16, threads=4, part=64) == zlib.crc32(data)


@pytest.mark.parametrize("max_nbytes,total,sms", [(1 << 18, 1 << 20, 132), (1 << 16, 1 << 28, 132), (100, 100, 132),
                                                  (16 << 20, 16 << 20, 132), (0, 0, 132), (1 << 20, 1 << 20, 1)])
def test_launch_shape(max_nbytes, total, sms):
    parts, log2_part, log2_r = k.launch_shape(max_nbytes, total, sms)
    part = 1 << log2_part
    assert part % k.STRIPE == 0
    assert parts * part >= max_nbytes and (parts - 1) * part < max(max_nbytes, 1)
    assert 32 << log2_r >= parts > (16 << log2_r) or log2_r == 0


def test_the_kernel_and_its_constants_are_built_once_per_device_across_threads(monkeypatch):
    # Concurrent first uses (Zarr encodes in worker threads) must share one module and constants table: a second
    # one, dropped later, would be freed while launches still read its address.
    import threading
    import time

    from cupycodec.kernels import crc32

    built = []

    def slow_build(device):
        built.append(device)
        time.sleep(0.05)  # a compile: long enough for every thread to arrive
        return (object(), device)

    monkeypatch.setattr(crc32, "_FUNCTIONS", {})
    monkeypatch.setattr(crc32, "_build", slow_build)
    start = threading.Barrier(8)
    got = []

    def first_use():
        start.wait()
        got.append(crc32._function(3))

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert built == [3] and len(got) == 8 and all(g is got[0] for g in got)
