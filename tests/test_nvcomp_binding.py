"""The nvCOMP ctypes binding (backends/_nvcomp_lib.py, codecs/_nvcomp_host.py) checked against the installed headers.

CPU only: the headers and both libraries ship in the nvidia-libnvcomp wheel, and nothing here needs a GPU. The
header tests compile small programs with the system C/C++ compiler and skip only when no compiler or no
nvidia-libnvcomp is installed (CI installs both).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
import types

import pytest

from cupycodec.backends import _nvcomp_lib as nvlib
from cupycodec.codecs import _nvcomp_host
from cupycodec.errors import BackendUnavailableError
from cupycodec.registry import get_codec


def _libnvcomp_dir() -> str | None:
    try:
        spec = importlib.util.find_spec("nvidia.libnvcomp")
    except (ModuleNotFoundError, ValueError):
        return None
    return None if spec is None or spec.origin is None else os.path.dirname(spec.origin)


LIBNVCOMP = _libnvcomp_dir()
needs_libnvcomp = pytest.mark.skipif(LIBNVCOMP is None, reason="nvidia-libnvcomp is not installed")


@pytest.fixture(autouse=True)
def _fresh():
    """Each test starts and ends with nothing loaded or memoized, so a monkeypatched failure cannot leak."""
    nvlib.clear_caches()
    _nvcomp_host._libs.cache_clear()
    yield
    nvlib.clear_caches()
    _nvcomp_host._libs.cache_clear()


def _tool(*names: str) -> str:
    for name in names:
        if name and (path := shutil.which(name)):
            return path
    pytest.skip(f"no {' or '.join(n for n in names if n)} on PATH")


def _build(tmp_path, source: str, lang: str, *, run: bool = True) -> str:
    """Compile ``source`` against the installed nvCOMP headers; the program's stdout, or the object file's path."""
    if LIBNVCOMP is None:
        pytest.skip("nvidia-libnvcomp is not installed")
    if lang == "c":
        compiler, std = _tool(os.environ.get("CC", ""), "cc", "gcc"), ["-x", "c", "-std=c11"]
    else:
        compiler, std = _tool(os.environ.get("CXX", ""), "c++", "g++"), ["-x", "c++", "-std=c++17"]
    # nvcomp.h includes <cuda_runtime.h> for cudaStream_t and native/bitcomp.h <cuda_fp16.h> for half; none of the
    # checked structs or signatures depends on anything else from CUDA, so stubs stand in for a CUDA toolkit.
    stub = tmp_path / "stub"
    stub.mkdir(exist_ok=True)
    (stub / "cuda_runtime.h").write_text("typedef struct CUstream_st *cudaStream_t;\n")
    (stub / "cuda_fp16.h").write_text("typedef struct { unsigned short x; } half;\n" if lang == "cpp" else "")
    src = tmp_path / f"probe.{lang}"
    src.write_text(source)
    exe = tmp_path / ("probe" if run else "probe.o")
    cmd = [compiler, *std, "-Werror", f"-I{stub}", f"-I{os.path.join(LIBNVCOMP, 'include')}", str(src),
           *(() if run else ("-c",)), "-o", str(exe)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr}"
    return subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout if run else str(exe)


# -- struct layouts ---------------------------------------------------------------------------------------------------


def test_ctypes_structs_match_the_layout_table():
    nvlib._check_layout()  # raises on any difference
    assert {s.__name__ for s in nvlib._STRUCTS} == set(nvlib._LAYOUT)


def test_layout_mismatch_names_struct_field_and_both_values(monkeypatch):
    table = dict(nvlib._LAYOUT)
    size, fields = table["nvcompBatchedANSDecompressOpts_t"]
    table["nvcompBatchedANSDecompressOpts_t"] = (size, {**fields, "skip_validate": 11})
    monkeypatch.setattr(nvlib, "_LAYOUT", table)
    with pytest.raises(BackendUnavailableError, match=r"nvcompBatchedANSDecompressOpts_t .*skip_validate is 10 in "
                                                      r"ctypes, 11 in the header"):
        nvlib._check_layout()
    table["nvcompBatchedANSDecompressOpts_t"] = (72, fields)
    with pytest.raises(BackendUnavailableError, match="nvcompBatchedANSDecompressOpts_t .*sizeof is 64 in ctypes, 72"):
        nvlib._check_layout()
    if LIBNVCOMP is not None:  # the load refuses, and the refusal is not remembered once the table is right again
        with pytest.raises(BackendUnavailableError, match="sizeof"):
            nvlib.library()
        monkeypatch.undo()
        assert nvlib.library() is not None


def test_layout_table_and_constants_match_the_installed_headers(tmp_path):
    lines = [f'printf("sizeof {name} %zu\\n", sizeof({name}));' for name in nvlib._LAYOUT]
    lines += [f'printf("field {name} {field} %zu %zu\\n", offsetof({name}, {field}), sizeof((({name} *)0)->{field}));'
              for name, (_, fields) in nvlib._LAYOUT.items() for field in fields]
    constants = [*nvlib._STATUS.values(), "NVCOMP_TYPE_CHAR", "NVCOMP_TYPE_UCHAR", "NVCOMP_TYPE_SHORT",
                 "NVCOMP_TYPE_USHORT", "NVCOMP_TYPE_INT", "NVCOMP_TYPE_UINT", "NVCOMP_TYPE_LONGLONG",
                 "NVCOMP_TYPE_ULONGLONG", "NVCOMP_TYPE_FLOAT8_E4M3", "NVCOMP_TYPE_FLOAT16", "NVCOMP_TYPE_FLOAT32",
                 "NVCOMP_TYPE_FLOAT64", "NVCOMP_TYPE_BITS", "NVCOMP_CASCADED_MODE_ASYMMETRIC",
                 "NVCOMP_CASCADED_MODE_UNSPECIFIED", "NVCOMP_CASCADED_TERMINAL_CODEC_CASCADED_BITPACK",
                 "NVCOMP_CASCADED_FINE_GRAINED_ENCODING_ALL"]
    lines += [f'printf("const {c} %lld\\n", (long long){c});' for c in constants]
    body = "\n  ".join(lines)
    out = _build(tmp_path, f"#include <stddef.h>\n#include <stdio.h>\n#include <nvcomp.h>\n"
                           f"int main(void) {{\n  {body}\n  return 0;\n}}\n", "c")
    header_sizes, header_fields, const = {}, {}, {}
    for line in out.splitlines():
        kind, *rest = line.split()
        if kind == "sizeof":
            header_sizes[rest[0]] = int(rest[1])
        elif kind == "field":
            header_fields[rest[0], rest[1]] = (int(rest[2]), int(rest[3]))
        else:
            const[rest[0]] = int(rest[1])
    structs = {s.__name__: s for s in nvlib._STRUCTS}
    for name, (nbytes, fields) in nvlib._LAYOUT.items():
        assert header_sizes[name] == nbytes == ctypes.sizeof(structs[name]), name
        for field, offset in fields.items():
            descr = getattr(structs[name], field)
            # the field's size too: a short `reserved` can hide in tail padding, where sizeof and offsets agree
            assert header_fields[name, field] == (offset, descr.size) and descr.offset == offset, (name, field)
    assert {code: name for name, code in const.items() if name in nvlib._STATUS.values()} == nvlib._STATUS

    from cupycodec.codecs.base import NVCOMP_DATA_TYPES

    names = ["CHAR", "UCHAR", "SHORT", "USHORT", "INT", "UINT", "LONGLONG", "ULONGLONG", "FLOAT8_E4M3", "FLOAT16",
             "FLOAT32", "FLOAT64"]
    ours = ["|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "|f1", "<f2", "<f4", "<f8"]
    assert {t: const[f"NVCOMP_TYPE_{n}"] for t, n in zip(ours, names)} == NVCOMP_DATA_TYPES
    c, d = nvlib.codec_opts(get_codec({"id": "cascaded", "data_type": "<i4"}))
    assert c.common_opts.mode == const["NVCOMP_CASCADED_MODE_ASYMMETRIC"]
    assert c.common_opts.terminal_codec_flags == const["NVCOMP_CASCADED_TERMINAL_CODEC_CASCADED_BITPACK"]
    assert c.fine_grained_encoding_flags == const["NVCOMP_CASCADED_FINE_GRAINED_ENCODING_ALL"]
    assert (d.common_opts.data_type, d.common_opts.mode) == (const["NVCOMP_TYPE_BITS"],
                                                             const["NVCOMP_CASCADED_MODE_UNSPECIFIED"])


_GDEFLATE_SIGNATURES = {
    _nvcomp_host._GDEFLATE_DECOMPRESS: "nvcomp::gdeflate::decompressCPU(void const* const*, unsigned long const*, "
                                       "unsigned long, void* const*, unsigned long*, unsigned long*)",
    _nvcomp_host._GDEFLATE_COMPRESS: "nvcomp::gdeflate::compressCPU(void const* const*, unsigned long const*, "
                                     "unsigned long, unsigned long, void* const*, unsigned long*, int)",
    _nvcomp_host._GDEFLATE_BOUND: "nvcomp::gdeflate::compressCPUGetMaxOutputChunkSize(unsigned long, unsigned long*)",
}


# -- declared signatures -------------------------------------------------------------------------------------------

# Prints, for each function, its return and parameter types as kind+size ("int4", "ptr8", "struct:<typedef name>"),
# taken from the header's declaration by template deduction.
_SIGNATURE_PROBE = r"""
#include <cstdio>
#include <typeinfo>
#include <type_traits>
#include <nvcomp.h>
#include <nvcomp/native/bitcomp.h>
#include <nvcomp/native/gdeflate_cpu.h>
template <class T> void kind() {
  if constexpr (std::is_void_v<T>) std::printf(" void");
  else if constexpr (std::is_pointer_v<T>) std::printf(" ptr%zu", sizeof(T));
  else if constexpr (std::is_integral_v<T> || std::is_enum_v<T>) std::printf(" int%zu", sizeof(T));
  else if constexpr (std::is_floating_point_v<T>) std::printf(" float%zu", sizeof(T));
  else std::printf(" struct:%s", typeid(T).name());
}
template <class F> struct sig;
template <class R, class... A> struct sig<R (*)(A...)> {  // decltype(&f) is unevaluated: nothing to link
  static void show(const char *name) { std::printf("%s", name); kind<R>(); (kind<A>(), ...); std::printf("\n"); }
};
int main() {
{calls}
}
"""


def _describe(t) -> str:
    if t is None:
        return "void"
    if issubclass(t, ctypes.Structure):
        return f"struct:{t.__name__}"
    if t is ctypes.c_void_p or issubclass(t, ctypes._Pointer):
        return f"ptr{ctypes.sizeof(ctypes.c_void_p)}"
    return f"{'float' if t is ctypes.c_double else 'int'}{ctypes.sizeof(t)}"


@needs_libnvcomp
def test_every_declared_function_matches_its_header_signature(tmp_path):
    lib, cpu = _nvcomp_host._libs()  # loads libnvcomp through nvlib.library(), so both sets are declared
    ours = {name: getattr(lib, name) for name in [*_nvcomp_host._BITCOMP_API, "nvcompGetProperties",
                                                  "nvcompBatchedCRC32Async", "nvcompBatchedCRC32GetHeuristicConf"]}
    for algo in nvlib._OPTS:
        for suffix in ("CompressGetTempSize", "CompressGetMaxOutputChunkSize", "CompressAsync",
                       "DecompressGetTempSize", "DecompressAsync"):
            ours[f"nvcompBatched{algo}{suffix}"] = getattr(lib, f"nvcompBatched{algo}{suffix}")
    ours.update({sig.split("(")[0]: getattr(cpu, mangled) for mangled, sig in _GDEFLATE_SIGNATURES.items()})
    calls = "\n".join(f'  sig<decltype(&{name})>::show("{name}");' for name in ours)
    out = _build(tmp_path, _SIGNATURE_PROBE.replace("{calls}", calls), "cpp")
    header = {}
    for line in out.splitlines():
        name, *types_ = line.split()
        header[name] = [re.sub(r"^struct:\d+", "struct:", t) for t in types_]  # Itanium typeid: length + name
    for name, fn in ours.items():
        assert [_describe(fn.restype), *map(_describe, fn.argtypes)] == header[name], name


# -- GDeflate's C++ symbols ------------------------------------------------------------------------------------------

@pytest.mark.skipif(sys.platform != "linux", reason="Itanium mangling of size_t as unsigned long (LP64 Linux)")
def test_mangled_gdeflate_names_demangle_to_the_header_declarations():
    cxxfilt = _tool("c++filt")
    names = list(_GDEFLATE_SIGNATURES)
    done = subprocess.run([cxxfilt, *names], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == [_GDEFLATE_SIGNATURES[n] for n in names]
    assert set(names) == set(_nvcomp_host._GDEFLATE_API)


@needs_libnvcomp
def test_the_header_mangles_to_our_names(tmp_path):
    nm = _tool("nm")
    obj = _build(tmp_path, "#include <nvcomp/native/gdeflate_cpu.h>\nvoid *refs[] = {\n"
                           "  (void *)&nvcomp::gdeflate::decompressCPU, (void *)&nvcomp::gdeflate::compressCPU,\n"
                           "  (void *)&nvcomp::gdeflate::compressCPUGetMaxOutputChunkSize};\n", "cpp", run=False)
    undefined = subprocess.run([nm, "-u", obj], capture_output=True, text=True, check=True).stdout.split()
    assert set(_nvcomp_host._GDEFLATE_API) <= set(undefined)


@needs_libnvcomp
def test_the_installed_cpu_library_exports_our_names():
    _, cpu = _nvcomp_host._libs()
    for name in _nvcomp_host._GDEFLATE_API:
        assert getattr(cpu, name).restype is None  # exported (getattr raises AttributeError otherwise) and declared


@needs_libnvcomp
def test_cpu_gdeflate_refuses_input_that_would_make_nvcomp_throw():
    from cupycodec.errors import FormatError

    with pytest.raises(ValueError, match="levels 0-12"):
        _nvcomp_host.gdeflate_encode(memoryview(b"x"), 13)
    with pytest.raises(ValueError, match="1 byte to 64 KiB"):
        _nvcomp_host.gdeflate_encode(memoryview(b""), 12)
    with pytest.raises(FormatError, match="empty gdeflate chunk"):
        _nvcomp_host.gdeflate_decode(memoryview(b""), memoryview(bytearray(8)))


# -- loading and the version gate ------------------------------------------------------------------------------------


@needs_libnvcomp
def test_library_loads_here_and_passes_the_checks():
    lib = nvlib.library()
    assert isinstance(lib, ctypes.CDLL) and nvlib.library() is lib  # cached once it succeeded
    assert nvlib.version()[0] in nvlib.SUPPORTED_MAJORS
    assert nvlib.version_string() == ".".join(map(str, nvlib.version()))
    assert lib.nvcompBatchedANSDecompressAsync.argtypes[8] is nvlib._OPTS["ANS"][1]


@needs_libnvcomp
def test_loaded_version_agrees_with_the_installed_version_header():
    with open(os.path.join(LIBNVCOMP, "include", "nvcomp", "version.h")) as f:
        text = f.read()
    parts = [int(re.search(rf"#define NVCOMP_VER_{p}\s+(\d+)", text).group(1)) for p in ("MAJOR", "MINOR", "PATCH")]
    assert nvlib.version() == tuple(parts)


@needs_libnvcomp
@pytest.mark.parametrize("found", [(7, 1, 0), (5, 3, 0)])
def test_other_majors_are_refused_with_the_fix(monkeypatch, found):
    import nvidia.libnvcomp

    monkeypatch.setattr(nvlib, "_read_version", lambda lib: found)
    fix = f"pip install 'nvidia-libnvcomp-cu{nvidia.libnvcomp.__cuda_version__}>=6,<7'"
    expected = f"cupycodec supports nvCOMP 6.x; found {'.'.join(map(str, found))}: {fix}"
    with pytest.raises(BackendUnavailableError, match=re.escape(expected)):
        nvlib.library()
    with pytest.raises(BackendUnavailableError, match=re.escape(expected)):  # the CPU GDeflate path is gated too
        _nvcomp_host._libs()
    monkeypatch.undo()
    assert nvlib.version()[0] == 6  # the refusal was not cached


def test_missing_library_is_reported_and_retried(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.libnvcomp", None)  # import now raises ImportError
    with pytest.raises(BackendUnavailableError, match=r'nvCOMP is not installed; pip install "cupycodec\[cu12\]"'):
        nvlib.library()
    monkeypatch.undo()
    if LIBNVCOMP is not None:
        assert nvlib.library() is not None


# -- availability ----------------------------------------------------------------------------------------------------


def _fake_cupy(is_available):
    class CUDARuntimeError(RuntimeError):
        pass

    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(CUDARuntimeError=CUDARuntimeError))
    cupy.is_available = lambda: is_available(CUDARuntimeError)
    return cupy


def test_reason_without_cupy_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    reason = nvlib.unavailable_reason()
    assert reason.startswith("CuPy is not installed") and 'pip install "cupycodec[cu12]"' in reason
    assert not nvlib.available()
    with pytest.raises(BackendUnavailableError, match='backend "nvcomp" cannot run here: CuPy is not installed'):
        nvlib.require()


def test_reason_with_a_broken_cuda(monkeypatch):
    def broken(error):
        raise error("cudaErrorInsufficientDriver")

    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(broken))
    assert nvlib.unavailable_reason() == "CUDA is not usable: cudaErrorInsufficientDriver"
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(lambda error: False))
    nvlib.clear_caches()
    assert nvlib.unavailable_reason() == "no usable CUDA device (cupy.is_available() is False)"


def test_bugs_are_not_hidden_as_unavailability(monkeypatch):
    def buggy(error):
        raise TypeError("a bug")

    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(buggy))
    with pytest.raises(TypeError, match="a bug"):
        nvlib.unavailable_reason()


@needs_libnvcomp
def test_with_a_usable_device_the_library_decides(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(lambda error: True))
    assert nvlib.unavailable_reason() is None and nvlib.available()
    monkeypatch.setattr(nvlib, "_read_version", lambda lib: (7, 0, 0))
    nvlib.clear_caches()
    assert "found 7.0.0" in nvlib.unavailable_reason()


def test_a_failure_is_retried_and_a_success_is_kept(monkeypatch):
    answers, now = iter(["no device", None, "no device"]), [100.0]
    monkeypatch.setattr(nvlib, "_probe", lambda: next(answers))
    monkeypatch.setattr(nvlib, "_clock", lambda: now[0])
    assert nvlib.unavailable_reason() == "no device"
    now[0] += nvlib._RETRY_S / 2
    assert nvlib.unavailable_reason() == "no device"  # reused briefly: available() is on every call's path
    now[0] += nvlib._RETRY_S
    assert nvlib.unavailable_reason() is None  # then asked again: the device came back
    now[0] += 1e6
    assert nvlib.unavailable_reason() is None  # success is kept (the third answer is never asked for)
    nvlib.clear_caches()
    assert nvlib.unavailable_reason() == "no device"


# -- options and size queries ----------------------------------------------------------------------------------------


def test_codec_opts_are_keyed_by_config_not_identity():
    a, b = get_codec({"id": "lz4"}), get_codec({"id": "lz4"})
    assert a is not b and nvlib.codec_opts(a) is nvlib.codec_opts(b)
    ans = nvlib.codec_opts(get_codec({"id": "ans", "data_type": "<f2"}))
    assert nvlib.codec_opts(get_codec({"id": "ans", "data_type": "|u1"})) is not ans
    assert (ans[0].data_type, ans[1].data_type, ans[1].skip_validate) == (10, 10, 0)
    assert type(ans[0]) is nvlib._OPTS["ANS"][0] and bytes(ans[1])[11:] == bytes(53)  # reserved bytes stay zero


def test_env_is_not_read_at_import_or_call():
    code = ("from cupycodec.backends import _nvcomp_lib as L; from cupycodec.registry import get_codec;"
            "print(L.codec_opts(get_codec({'id': 'ans', 'data_type': '|u1'}))[1].skip_validate)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "CUPYCODEC_ANS_SKIP_VALIDATE": "1", "PYTHONPATH": root}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "0"


@needs_libnvcomp
def test_size_queries_are_memoized_by_config_and_geometry(monkeypatch):
    codec = get_codec({"id": "lz4"})  # LZ4's size queries need no CUDA device
    temp, max_out = nvlib.compress_sizes(codec, 4, 65536, 4 * 65536)
    assert temp > 0 and max_out > 65536 and nvlib.decompress_temp(codec, 4, 65536, 4 * 65536) >= 0
    monkeypatch.setattr(nvlib, "_call", lambda *a: pytest.fail("not memoized"))
    assert nvlib.compress_sizes(get_codec({"id": "lz4"}), 4, 65536, 4 * 65536) == (temp, max_out)
    nvlib.decompress_temp(codec, 4, 65536, 4 * 65536)
    monkeypatch.undo()
    nvlib.clear_caches()
    assert not len(nvlib._compress_cache) and not len(nvlib._decompress_cache) and not len(nvlib._opts_cache)


def test_lru_is_bounded():
    from cupycodec._lru import LRU

    cache = LRU(2)
    for key in "abca":
        cache.get(key, lambda k=key: k.upper())
    cache.get("d", lambda: "D")  # evicts "b", the least recently used
    assert list(cache._data) == ["a", "d"] and cache.get("a", lambda: pytest.fail("evicted")) == "A"


@needs_libnvcomp
def test_async_functions_by_codec():
    fn, name = nvlib.compress_fn(get_codec({"id": "gdeflate"}))
    assert name == "nvcompBatchedGdeflateCompressAsync" and fn.argtypes[8] is nvlib._OPTS["Gdeflate"][0]
    fn, name = nvlib.decompress_fn(get_codec({"id": "zstd"}))
    assert name == "nvcompBatchedZstdDecompressAsync" and fn.restype is ctypes.c_int


def test_status_names_and_gaps():
    assert nvlib.status_name(12) == "nvcompErrorCannotDecompress" and nvlib.status_name(7) == "nvcompStatus(7)"
    assert sorted(nvlib.LEAVES_GAPS) == ["ANS", "GDeflate"]


@needs_libnvcomp
def test_clear_caches_never_waits_for_a_lock_another_thread_holds():
    # After fork, the child's copy of a lock held by a parent thread is never released; clear_caches replaces it.
    held, release = threading.Event(), threading.Event()
    old_lock = nvlib._lock

    def hold():
        with old_lock:
            held.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(10)
    try:
        nvlib.clear_caches()
        assert nvlib.library() is not None
    finally:
        release.set()
        t.join()
