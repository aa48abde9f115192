"""The dtype vocabulary of the container ("F16", "BF16", "I8", ...) and its mapping to NumPy and CuPy dtypes.

Names follow safetensors. The byte order travels separately (``"<"``, ``">"`` or ``"|"``), so a big-endian array
round-trips with its bytes untouched. ``bfloat16`` and the float8 types are NumPy dtypes only through ``ml_dtypes``,
which is imported lazily, the first time such a dtype is seen.
"""

from __future__ import annotations

import re
import sys

import numpy as np

from .errors import FormatError, UnsupportedDtypeError, UnsupportedDtypeInFileError

__all__ = [
    "SUPPORTED",
    "ArraySpec",
    "dtype_name",
    "extent_nbytes",
    "is_float",
    "itemsize",
    "numpy_dtype",
    "storage_dtype",
]

# name -> (numpy type character or ml_dtypes attribute, itemsize, kind); kind "f" covers every float.
_BUILTIN = {
    "BOOL": ("?", 1, "b"),
    "U8": ("u1", 1, "u"),
    "I8": ("i1", 1, "i"),
    "U16": ("u2", 2, "u"),
    "I16": ("i2", 2, "i"),
    "U32": ("u4", 4, "u"),
    "I32": ("i4", 4, "i"),
    "U64": ("u8", 8, "u"),
    "I64": ("i8", 8, "i"),
    "F16": ("f2", 2, "f"),
    "F32": ("f4", 4, "f"),
    "F64": ("f8", 8, "f"),
    "C64": ("c8", 8, "c"),
    "C128": ("c16", 16, "c"),
}
_ML_DTYPES = {  # name -> (ml_dtypes attribute, itemsize)
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
_ML_BY_ATTR = {attr: name for name, (attr, _) in _ML_DTYPES.items()}

SUPPORTED: tuple[str, ...] = (
    "bool", "int8/16/32/64", "uint8/16/32/64", "float16/32/64", "long double", "complex64/128",
    "complex long double", "bfloat16 (ml_dtypes)", "float8_e4m3fn/float8_e5m2 (ml_dtypes)",
)


def _longdouble_name(complex_: bool) -> str:
    # long double is platform-specific (x86: 80-bit in 16 bytes; aarch64: IEEE quad), so its name records
    # the storage size and the mantissa width, and a reader on a different platform refuses it.
    info = np.finfo(np.longdouble)
    size = np.dtype(np.longdouble).itemsize * (2 if complex_ else 1)
    return f"{'C' if complex_ else 'F'}LD{size * 8}M{info.nmant}"


def dtype_name(dtype: np.dtype) -> tuple[str, str]:
    """Return ``(name, byteorder)`` for a NumPy (or CuPy) dtype, or raise :class:`UnsupportedDtypeError`.

    ``byteorder`` is ``"|"`` for one-byte types and ``"<"`` or ``">"`` otherwise.
    """
    hit = _NAMES.get(dtype) if isinstance(dtype, np.dtype) else None
    if hit is None:
        hit = _dtype_name(dtype)
        if isinstance(dtype, np.dtype) and len(_NAMES) < 256:
            _NAMES[dtype] = hit
    return hit


_NAMES: dict[np.dtype, tuple[str, str]] = {}


def _dtype_name(dtype) -> tuple[str, str]:
    dtype = np.dtype(dtype)
    if dtype.fields is not None or dtype.subdtype is not None:
        raise UnsupportedDtypeError(dtype, SUPPORTED, "structured and sub-array dtypes cannot be stored; "
                                    "compress each field separately")
    order = _byteorder(dtype)
    module = getattr(dtype.type, "__module__", "")
    if module.startswith("ml_dtypes"):
        name = _ML_BY_ATTR.get(dtype.name)
        if name is None:
            raise UnsupportedDtypeError(dtype, SUPPORTED)
        return name, order
    if dtype.kind in "biufc" and dtype.type is not np.longdouble and dtype.type is not np.clongdouble:
        for name, (char, size, kind) in _BUILTIN.items():
            if dtype.kind == kind and dtype.itemsize == size and (kind != "b" or char == "?"):
                return name, order
    if dtype.type is np.longdouble:
        return _longdouble_name(False), order
    if dtype.type is np.clongdouble:
        return _longdouble_name(True), order
    hint = ""
    if dtype.kind == "O":
        hint = "object arrays hold Python references, not data"
    elif dtype.kind in "SUV":
        hint = "encode strings or raw records as uint8 first"
    elif dtype.kind in "mM":
        hint = "store datetimes as int64 (arr.view('i8')) and keep the unit yourself"
    raise UnsupportedDtypeError(dtype, SUPPORTED, hint)


def _byteorder(dtype: np.dtype) -> str:
    if dtype.itemsize == 1 or dtype.byteorder == "|":
        return "|"
    if dtype.byteorder == "=":
        return "<" if sys.byteorder == "little" else ">"
    return dtype.byteorder


def itemsize(name: str) -> int:
    """Bytes per element of a vocabulary name; raises :class:`FormatError` for an unknown name."""
    if name in _BUILTIN:
        return _BUILTIN[name][1]
    if name in _ML_DTYPES:
        return _ML_DTYPES[name][1]
    size = _parse_longdouble(name)
    if size is None:
        raise FormatError(f"unknown dtype name {name!r} in header")
    return size[0]


def _parse_longdouble(name: str) -> tuple[int, int] | None:
    if not (name.startswith(("FLD", "CLD")) and "M" in name[3:]):
        return None
    m = re.fullmatch(r"([0-9]{1,4})M([0-9]{1,4})", name[3:])  # ASCII digits: isdigit() took "¹²⁸" and 5000 digits
    if m is None or int(m[1]) % 8:
        return None
    return int(m[1]) // 8, int(m[2])


def is_float(name: str) -> bool:
    """True for the real floating-point names (F16, BF16, F32, F64, F8_*, long double)."""
    return name in ("F16", "F32", "F64") or name in _ML_DTYPES or name.startswith("FLD")


def numpy_dtype(name: str, byteorder: str = "|") -> np.dtype:
    """The NumPy dtype for a vocabulary name and byte order (``ml_dtypes`` is imported for BF16 and F8)."""
    if byteorder not in ("<", ">", "|"):
        raise FormatError(f"byte order must be '<', '>' or '|', got {byteorder!r}")
    if name in _BUILTIN:
        dt = np.dtype(_BUILTIN[name][0])
    elif name in _ML_DTYPES:
        try:
            import ml_dtypes
        except ImportError as exc:  # pragma: no cover - ml_dtypes is a dependency
            raise UnsupportedDtypeError(name, SUPPORTED, "pip install ml_dtypes to use it with NumPy") from exc
        dt = np.dtype(getattr(ml_dtypes, _ML_DTYPES[name][0]))
    else:
        parsed = _parse_longdouble(name)
        if parsed is None:
            raise FormatError(f"unknown dtype name {name!r} in header")
        complex_ = name[0] == "C"
        if _longdouble_name(complex_) != name:  # a name only a file on another platform holds
            raise UnsupportedDtypeInFileError(
                name, SUPPORTED,
                f"this platform's long double is {_longdouble_name(complex_)}; read it on the platform that wrote it",
            )
        dt = np.dtype(np.clongdouble if complex_ else np.longdouble)
    if dt.itemsize == 1 or byteorder == "|":
        return dt
    swapped = dt.newbyteorder(byteorder)
    return dt if swapped.isnative else swapped  # native order as NumPy spells it: dtype('float32'), not '<f4'



def gpu_dtype(name: str) -> np.dtype:
    """The dtype a CuPy array of this logical dtype gets: the ml_dtypes type where CuPy supports it (CuPy >= 14
    holds bfloat16), else :func:`storage_dtype`'s same-width integer."""
    hit = _GPU_DTYPES.get(name)
    if hit is None:
        hit = numpy_dtype(name) if name in _ML_DTYPES and _cupy_supports(name) else storage_dtype(name)
        _GPU_DTYPES[name] = hit
    return hit


_GPU_DTYPES: dict[str, np.dtype] = {}


_CUPY_SUPPORT: dict[str, bool] = {}


def _cupy_supports(name: str) -> bool:
    if name not in _CUPY_SUPPORT:
        try:
            import cupy

            cupy.zeros(2, dtype=numpy_dtype(name)).view(storage_dtype(name))
            _CUPY_SUPPORT[name] = True
        except (TypeError, ValueError):  # older CuPy: "Unsupported dtype" for ml_dtypes types
            _CUPY_SUPPORT[name] = False
    return _CUPY_SUPPORT[name]


def storage_dtype(name: str) -> np.dtype:
    """A native-order NumPy dtype with the same itemsize that CuPy can hold (BF16 -> uint16, F8 -> uint8)."""
    if name in _ML_DTYPES:
        return np.dtype({1: np.uint8, 2: np.uint16}[_ML_DTYPES[name][1]])
    return numpy_dtype(name).newbyteorder("=")


def extent_nbytes(shape, size: int) -> int:
    """``size`` times the product of the non-zero dimensions of ``shape``: what NumPy bounds (below 2**63) when it
    makes an array, an empty one included, so no array of a shape where this reaches 2**63 can exist."""
    n = size
    for s in shape:
        if s:
            n *= s
    return n


class ArraySpec:
    """What a segment or an array holds: a vocabulary dtype name, a byte order and a shape (immutable)."""

    __slots__ = ("byteorder", "dtype", "shape")

    def __init__(self, dtype: str, byteorder: str, shape: tuple[int, ...]):
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "byteorder", "|" if itemsize(dtype) == 1 else byteorder)
        object.__setattr__(self, "shape", tuple(int(s) for s in shape))

    def __reduce__(self):  # immutable and slotted: rebuilt from its fields
        return (type(self), (self.dtype, self.byteorder, self.shape))

    def __setattr__(self, name, value):
        raise AttributeError("ArraySpec is immutable")

    @classmethod
    def of(cls, arr, dtype_override: str | None = None) -> ArraySpec:
        """The spec of a NumPy/CuPy array (``dtype_override`` names the logical dtype of a raw bit view)."""
        name, order = dtype_name(arr.dtype)
        if dtype_override is not None:
            if itemsize(dtype_override) != arr.dtype.itemsize:
                raise ValueError(
                    f"dtype={dtype_override!r} has itemsize {itemsize(dtype_override)} but the array's dtype "
                    f"{arr.dtype} has itemsize {arr.dtype.itemsize}; pass a bit view of the same width"
                )
            name = dtype_override
        return cls(name, order, arr.shape)

    @property
    def itemsize(self) -> int:
        return itemsize(self.dtype)

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.size * self.itemsize

    def numpy_dtype(self) -> np.dtype:
        return numpy_dtype(self.dtype, self.byteorder)

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "byteorder": self.byteorder, "shape": list(self.shape)}

    def __eq__(self, other):
        if not isinstance(other, ArraySpec):
            return NotImplemented
        return (self.dtype, self.byteorder, self.shape) == (other.dtype, other.byteorder, other.shape)

    def __hash__(self):
        return hash((self.dtype, self.byteorder, self.shape))

    def __repr__(self):
        return f"ArraySpec({self.dtype!r}, {self.byteorder!r}, {self.shape!r})"
