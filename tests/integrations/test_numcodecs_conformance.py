"""numcodecs' own conformance helpers (``numcodecs.tests.common``) run on the numcodecs codec.

numcodecs 0.16 ships the helpers in its wheel; 0.17 (Python >= 3.12) does not, and then this module skips.
"""

from __future__ import annotations

import os

import pytest

common = pytest.importorskip("numcodecs.tests.common", reason="this numcodecs does not ship numcodecs.tests")

from test_numcodecs_codec import ARRAYS, LOSSLESS  # noqa: E402  # the same codecs and arrays as the unit tests

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "numcodecs")


@pytest.mark.parametrize("codec", LOSSLESS, ids=repr)
@pytest.mark.parametrize("arr", ARRAYS, ids=lambda a: f"{a.dtype.str}{a.shape}")
def test_numcodecs_conformance(codec, arr):
    if codec.get_config().get("filters") == ["byteplane"]:
        # byte planes need 2-, 4- or 8-byte words, and check_encode_decode also encodes the array's raw bytes
        if arr.dtype.itemsize not in (2, 4, 8):
            with pytest.raises(ValueError, match="byteplane needs 2-, 4- or 8-byte words"):
                codec.encode(arr)
            return
        common.check_encode_decode_array(arr, codec)
        return
    common.check_encode_decode(arr, codec)
    common.check_encode_decode_array(arr, codec)


@pytest.mark.parametrize("codec", LOSSLESS[:2], ids=repr)
def test_numcodecs_object_buffers_are_refused(codec):
    common.check_err_encode_object_buffer(codec)
    common.check_err_decode_object_buffer(codec)


def test_backwards_compatibility(monkeypatch):
    # numcodecs' helper: committed arrays and encodings under tests/fixtures/numcodecs/fixture/cupycodec/ must keep
    # decoding to the same bytes, and the configs must keep parsing to the same codecs (written once, on first run).
    monkeypatch.chdir(FIXTURES)
    arrays = [ARRAYS[0][::10], ARRAYS[1][:20, :50], ARRAYS[3][:5], ARRAYS[5][:300], ARRAYS[6]]
    common.check_backwards_compatibility("cupycodec", arrays, LOSSLESS)


@pytest.mark.parametrize("codec", LOSSLESS, ids=repr)
def test_config(codec):
    common.check_config(codec)
