"""Every CUDA kernel source compiles with NVRTC for the GPUs the library targets (sm_80, sm_90), on a machine without
a GPU, with no register spills: CI checks what only a GPU could otherwise run (whether the kernels compute the right
thing is the GPU tests' job). NVRTC comes from the ``nvidia-cuda-nvrtc-cu12`` wheel, which CI installs;
``CUPYCODEC_REQUIRE_NVRTC=1`` makes a missing one a failure instead of a skip."""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import re

import pytest

from cupycodec.kernels import byteplane, chunks, crc32, gemv, int8

ARCHS = ("sm_80", "sm_90")


def _library():
    try:
        spec = importlib.util.find_spec("nvidia.cuda_nvrtc")
    except (ImportError, ValueError):
        spec = None
    paths = [p for root in (spec.submodule_search_locations if spec else []) or []
             for p in sorted(glob.glob(os.path.join(root, "lib", "libnvrtc.so*"))) if "alt" not in p]
    for path in paths:
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    if os.environ.get("CUPYCODEC_REQUIRE_NVRTC") == "1":
        pytest.fail("CUPYCODEC_REQUIRE_NVRTC=1 but NVRTC is not installed (pip install nvidia-cuda-nvrtc-cu12)")
    pytest.skip("NVRTC is not installed (pip install nvidia-cuda-nvrtc-cu12)")


@pytest.fixture(scope="module")
def nvrtc():
    return _library()


def _version(lib) -> tuple[int, int]:
    major, minor = ctypes.c_int(), ctypes.c_int()
    assert lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)) == 0
    return major.value, minor.value


def _compile(lib, source: str, arch: str, options: tuple[str, ...]) -> tuple[int, str]:
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"cupycodec.cu", 0, None, None) == 0
    try:
        opts = [f"--gpu-architecture={arch}", *options, "-Xptxas", "-v"]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts]))
        n = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetProgramLog(prog, log)
        return rc, log.value.decode(errors="replace")
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _gemv_instances() -> str:
    """The instances the launcher asks for: the tensor-core and FMA kernels, every activation dtype, M bound,
    granularity and warps per tile, and every depth at 8 warps."""
    lines = []
    for w in (1, 2, 3, 4, 5, 8, 12, 16):
        for grouped in (False, True):
            for dt in ("BF16", "F16"):
                for mm in (8, 16):
                    for u in (2, 4, 8) if w == 8 else (2,):  # every depth at the default warps
                        lines.append(gemv._source("mma", dt, mm, w, grouped, u)[0])
            if w not in (1, 2, 4, 8):
                continue
            for dt in ("BF16", "F16", "F32"):
                for mm in (1, 2, 4, 8, 16):
                    lines.append(gemv._source("fma", dt, mm, w, grouped)[0])
    return "\n".join(dict.fromkeys(lines))


SOURCES = {
    "byteplane": lambda: (byteplane._SOURCE, ("--std=c++14",)),
    "chunks": lambda: (chunks._SOURCE, ("--std=c++14",)),
    "crc32": lambda: (crc32._SOURCE, ("--std=c++14",)),
    "int8": lambda: (int8._SOURCE, ()),  # as int8._module compiles it: NVRTC's defaults
    "gemv": lambda: (f"{gemv._SOURCE}\n{_gemv_instances()}\n", ("--std=c++14",)),
}


# Spills found when this test was written (NVRTC 12.9), on cold paths: the FMA GEMV (fp32 activations, groups of
# 16-48, GPUs before sm_80) at M >= 4 holds M accumulators and a converted step per lane; the fp16 warp quantizer
# (compression only). Anything else that spills fails: the decode, CRC and tensor-core GEMV kernels must not. Other
# NVRTC majors allocate registers their own way: there, compiling is checked, not spills.
KNOWN_SPILLS = re.compile(r"cupycodec_gemv_int8_(bf16|f16|f32)_m(4|8|16)_w\d|cupycodec_int8_quantize_warp_f16")


@pytest.fixture(scope="module")
def compiled(nvrtc):
    """Every (module, arch) compiled at once: NVRTC runs without the GIL, so the cores share the work."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = {(m, a): SOURCES[m]() for m in SOURCES for a in ARCHS}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        futures = {key: pool.submit(_compile, nvrtc, src, key[1], opts) for key, (src, opts) in jobs.items()}
        return {key: (jobs[key][0], *f.result()) for key, f in futures.items()}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("module", sorted(SOURCES))
def test_every_kernel_compiles_without_new_spills(nvrtc, compiled, module, arch):
    source, rc, log = compiled[(module, arch)]
    assert rc == 0, log[-4000:]
    entries = re.findall(r"Compiling entry function '(\w+)'", log)
    assert entries, log[-2000:]
    spills = {name: int(n) for name, n in re.findall(r"Function properties for (\w+)\n[^\n]*?(\d+) bytes spill stores",
                                                       log)}
    assert set(spills) >= set(entries)
    new = {name: n for name, n in spills.items() if n and not KNOWN_SPILLS.fullmatch(name)}
    assert not new or _version(nvrtc)[0] != 12, f"{arch}: registers spill in {new}"
    if module == "gemv":  # every requested instance
        assert len(set(entries)) == sum(source.count(f"{m}(") - 1 for m in ("CC_GEMV_TC", "CC_GEMV"))
