"""Crafted containers through every default (untrusted) entry point on a GPU; the same run under compute-sanitizer.

A crafted container has 1-8 payload bytes changed and every CRC recomputed (tests/fuzzing.py), so it passes
``from_bytes(verify=True)``: what an attacker sends. nvCOMP's decoders misbehave on such input (illegal memory
accesses, dead CUDA contexts, wrong data with no error; see benchmarks/fuzz_gpu.py), so bytes from outside are
untrusted by default: their chunks are decoded on the CPU and uploaded, and the NVIDIA-only formats are refused with
cc.UntrustedError. Through the default entry points only cc.UntrustedError and cc.FormatError may escape, results
have the right shape and dtype, and the CUDA context stays healthy; compute-sanitizer's memcheck sees no error.
``from_bytes(..., trusted=True)`` still decodes on the GPU.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fuzzing import chunks, mutate

import cupycodec as cc

pytestmark = [pytest.mark.gpu, pytest.mark.nvcomp]

ROOT = Path(__file__).resolve().parents[2]
CODECS = ["raw", "lz4", "snappy", "gdeflate", "deflate", "zstd", "gzip", "cascaded", "bitcomp", "ans"]
NVIDIA_ONLY = {"gdeflate", "cascaded", "bitcomp", "ans"}  # refused when untrusted: no hardened CPU decoder
UNDER_SANITIZER = os.environ.get("CUPYCODEC_FUZZ_UNDER_SANITIZER") == "1"  # set by the sanitizer test: no recursion
SOURCES_DIR = os.environ.get("CUPYCODEC_FUZZ_SOURCES")  # containers written by the parent of the sanitized run
N_BLOBS = 3 if UNDER_SANITIZER else 30
ARRAY_NBYTES = 256 * 1024
CHUNK_NBYTES = 64 * 1024
HARNESS = "test_crafted_blobs_through_every_default_entry_point"


@pytest.fixture(scope="module")
def cp():
    import cupy

    return cupy


def host_arrays() -> list[tuple[str, np.ndarray, str | None]]:
    """(name, host array, dtype override): int32 that every codec encodes, and bf16 weights as uint16 bits."""
    import ml_dtypes

    rng = np.random.default_rng(7)
    n = ARRAY_NBYTES // 4
    i32 = ((np.arange(n) % 977) + rng.integers(0, 8, n)).astype(np.int32).reshape(-1, 256)
    w = (0.02 * rng.standard_t(5, ARRAY_NBYTES // 2)).astype(np.float32).astype(ml_dtypes.bfloat16)
    return [("i32", i32, None), ("bf16", w.view(np.uint16).reshape(-1, 512), "bfloat16")]


def make_sources(codec: str) -> list[tuple[str, bytes, np.ndarray]]:
    """GPU-compressed containers of :func:`host_arrays` (name, container bytes, host array)."""
    import cupy

    out = []
    for name, host, dtype in host_arrays():
        c = cc.compress(cupy.asarray(host), codec=codec, chunk_nbytes=CHUNK_NBYTES, dtype=dtype)
        assert c.producer["backend"] == "nvcomp"
        out.append((name, c.to_bytes(), host))
    return out


def write_sources(directory: Path) -> None:
    for codec in CODECS:
        for name, blob, host in make_sources(codec):
            (directory / f"{codec}-{name}.cc").write_bytes(blob)
            np.save(directory / f"{codec}-{name}.npy", host)


@pytest.fixture(scope="module")
def sources():
    if SOURCES_DIR:  # under compute-sanitizer: only decoding is under test, so the parent compressed these
        d = Path(SOURCES_DIR)
        return {codec: [(name, (d / f"{codec}-{name}.cc").read_bytes(), np.load(d / f"{codec}-{name}.npy"))
                        for name, _, _ in host_arrays()] for codec in CODECS}
    return {codec: make_sources(codec) for codec in CODECS}


def _host_bytes(y) -> bytes:
    import cupy

    return np.ascontiguousarray(cupy.asnumpy(y)).reshape(-1).view(np.uint8).tobytes()


def _reference(good: bytes, host: np.ndarray, codec: str):
    """The good container through the default path: the decoded CuPy array (checked), or None when refused."""
    try:
        y = cc.decompress(good, device="cuda")
    except cc.UntrustedError as exc:
        assert codec in NVIDIA_ONLY, f"untrusted {codec} must be decoded on the CPU, not refused: {exc}"
        assert "trusted=True" in str(exc) and "key=" in str(exc), str(exc)
        return None
    assert y.shape == host.shape and _host_bytes(y) == host.tobytes()
    return y


def _entry_points(blob: bytes, path: Path, shape, out_dtype):
    """(name, thunk returning a list of results) for every default way in."""
    import cupy

    def plain():
        return [cc.decompress(blob, device="cuda")]

    def parsed():
        c = cc.CompressedArray.from_bytes(blob)
        assert c.trusted is False
        return [cc.decompress(c, device="cuda")]

    def many():
        return cc.decompress_many([blob, cc.CompressedArray.from_bytes(blob)], device="cuda")

    def loaded():
        path.write_bytes(blob)
        c = cc.load(path)
        assert c.trusted is False
        return [cc.decompress(c, device="cuda")]

    def plan():
        c = cc.CompressedArray.from_bytes(blob).to_device()
        out = cupy.empty(shape, dtype=out_dtype)
        cc.decode_plan([c], [out]).run_and_wait()
        return [out]

    return [("decompress(bytes)", plain), ("decompress(from_bytes)", parsed), ("decompress_many", many),
            ("load", loaded), ("decode_plan", plan)]


def _check_context(cp) -> None:
    cp.cuda.runtime.deviceSynchronize()
    assert int((cp.arange(1024, dtype=cp.int32) * 2).sum()) == 1023 * 1024  # a small kernel still runs


@pytest.mark.parametrize("codec", CODECS)
def test_crafted_blobs_through_every_default_entry_point(codec, sources, tmp_path, cp):
    if codec != "raw":  # crafted bytes must reach a decoder: most of the int32 source's chunks are encoded
        flags = [c.flag for c in chunks(sources[codec][0][1])]
        assert 2 * flags.count(0) >= len(flags), f"{codec}: {flags.count(0)}/{len(flags)} chunks encoded"
    seen = collections.Counter()
    plan_accepted = 0
    refs = {name: _reference(good, host, codec) for name, good, host in sources[codec]}
    expect_refused = 0
    for k in range(N_BLOBS):
        name, good, host = sources[codec][k % len(sources[codec])]
        ref = refs[name]
        must_refuse = codec in NVIDIA_ONLY and any(c.flag == 0 for c in chunks(good))
        expect_refused += 5 if must_refuse else 1  # decode_plan refuses untrusted containers (all-stored ones aside)
        rng = np.random.default_rng([CODECS.index(codec), k])
        blob = mutate(good, rng, int(rng.integers(1, 9)))
        out_dtype = host.dtype if ref is None else ref.dtype
        for entry, run in _entry_points(blob, tmp_path / f"{k}.cc", host.shape, out_dtype):
            where = f"{codec}/{name} blob {k} via {entry}"
            try:
                results = run()
            except cc.UntrustedError as exc:
                assert codec in NVIDIA_ONLY or entry == "decode_plan", f"{where}: refused: {exc}"
                seen["refused"] += 1
                continue
            except cc.FormatError as exc:
                assert not must_refuse and entry != "decode_plan", f"{where}: {exc!r} instead of UntrustedError"
                seen["reported"] += 1
                continue
            # any other exception fails the test as it is
            if entry == "decode_plan":  # only an untrusted container whose chunks are all stored: bounded copies
                assert _all_stored(blob), f"{where}: decode_plan accepted an untrusted container with encoded chunks"
                plan_accepted += 1
            assert not must_refuse, f"{where}: an untrusted {codec} container was decoded"
            assert ref is not None, f"{where}: decoded though the unmodified container was refused"
            for y in results:
                assert isinstance(y, cp.ndarray) and y.shape == ref.shape and y.dtype == ref.dtype, where
            seen["same" if _host_bytes(results[0]) == host.tobytes() else "silent_wrong"] += 1
        _check_context(cp)
    assert sum(seen.values()) == 5 * N_BLOBS
    assert seen["refused"] + plan_accepted >= expect_refused, seen
    if codec not in NVIDIA_ONLY:
        assert seen["refused"] + plan_accepted == N_BLOBS, seen  # only decode_plan refuses


def _all_stored(blob: bytes) -> bool:
    """Whether every chunk of ``blob`` is stored (no decoder runs), the one case decode_plan takes untrusted."""
    c = cc.CompressedArray.from_bytes(blob)
    return not any(s.table.n_encoded for s in c.segments)


@pytest.mark.parametrize("codec", CODECS)
def test_trusted_bytes_still_decode_on_the_gpu(codec, sources, cp):
    for _name, good, host in sources[codec]:
        assert cc.CompressedArray.from_bytes(good).trusted is False
        c = cc.CompressedArray.from_bytes(good, trusted=True)
        assert c.trusted is True
        y = cc.decompress(c, device="cuda")
        assert isinstance(y, cp.ndarray) and y.shape == host.shape and _host_bytes(y) == host.tobytes()
        out = cp.empty(host.shape, dtype=y.dtype)
        plan = cc.decode_plan([c.to_device()], [out])
        plan.run()
        plan.check()
        assert _host_bytes(out) == host.tobytes()
    _check_context(cp)


def _skip_or_fail(reason: str):
    if os.environ.get("CUPYCODEC_REQUIRE_GPU") == "1":
        pytest.fail(f"{reason}; CUPYCODEC_REQUIRE_GPU=1 forbids skipping the compute-sanitizer check")
    pytest.skip(reason)


@pytest.mark.skipif(UNDER_SANITIZER, reason="this is the run under compute-sanitizer")
def test_default_path_is_clean_under_compute_sanitizer(tmp_path):
    """The harness above, 3 blobs per codec, under memcheck in a subprocess.

    Expected to take 1-2 minutes on one H200 (an estimate: CuPy start-up under memcheck dominates; not yet timed).
    The parent compresses the sources, so the sanitized process only decodes.
    """
    exe = shutil.which("compute-sanitizer")
    if exe is None:
        _skip_or_fail("compute-sanitizer is not on the PATH")
    src = tmp_path / "sources"
    src.mkdir()
    write_sources(src)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # not an xdist worker's settings
    env.update(CUPYCODEC_FUZZ_UNDER_SANITIZER="1", CUPYCODEC_FUZZ_SOURCES=str(src))
    cmd = [exe, "--tool", "memcheck", "--error-exitcode", "99", sys.executable, "-m", "pytest", str(Path(__file__)),
           "-k", HARNESS, "-p", "no:cacheprovider", "-p", "no:xdist", "-p", "no:benchmark", "-q"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    if "Device not supported" in out:
        _skip_or_fail("compute-sanitizer does not support this device")
    assert proc.returncode == 0, out[-8000:]
    assert "ERROR SUMMARY: 0 errors" in out, out[-8000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) == len(CODECS), out[-4000:]
