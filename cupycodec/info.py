"""``cupycodec.info()``: versions, the GPU, nvCOMP, and which codecs run where on this machine."""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from typing import Any

__all__ = ["format_info", "info"]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _first_version(*dists: str) -> str | None:
    for d in dists:
        v = _version(d)
        if v:
            return f"{d} {v}"
    return None


def info() -> dict[str, Any]:
    """Describe this installation: library versions, the GPU and CUDA runtime, nvCOMP, codec availability.

    Returns a dict (``format_info`` renders it as text; ``python -m cupycodec info`` prints that). Torch is reported
    from package metadata only: it is never imported.
    """
    from . import backends, registry
    from ._version import __version__
    from .backends import _nvcomp_lib as nvcomp
    from .backends import cpu

    out: dict[str, Any] = {
        "cupycodec": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "numpy": _version("numpy"),
        "zstandard": _version("zstandard"),
        "cramjam": _version("cramjam"),
        "ml_dtypes": _version("ml_dtypes"),
        "blosc2": _version("blosc2"),  # its library splits and merges byte planes on the CPU
        "isal": _version("isal"),  # CRC-32 on the CPU
        "blake3": _version("blake3"),  # the MACs of signed containers
        "cupy": _first_version("cupy-cuda12x", "cupy-cuda13x", "cupy"),
        "nvcomp_package": _first_version("nvidia-libnvcomp-cu12", "nvidia-libnvcomp-cu13"),
        "torch": _version("torch"),
        "cpu_threads": cpu.num_threads(),
    }
    reason = nvcomp.unavailable_reason()
    gpu: dict[str, Any] = {"available": reason is None, "reason": reason}
    try:
        import cupy
    except ImportError:
        cupy = None
    try:
        if cupy is not None and cupy.is_available():
            props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
            gpu.update(name=props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
                       compute_capability=f"{props['major']}.{props['minor']}",
                       memory_gib=round(props["totalGlobalMem"] / 2**30, 1),
                       cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(),
                       cuda_driver=cupy.cuda.runtime.driverGetVersion(),
                       device_count=cupy.cuda.runtime.getDeviceCount())
    except (RuntimeError, OSError) as exc:  # pragma: no cover - broken CUDA installs: reported, not raised
        gpu["error"] = str(exc)
    if reason is None:
        gpu["nvcomp"] = nvcomp.version_string()
    out["gpu"] = gpu
    out["codecs"] = {
        cid: {"cpu": bool(cls.cpu_usable()), "gpu": cls.nvcomp_algorithm is not None or cid == "raw",
              "usable_here": bool(cls.cpu_usable()) or reason is None}
        for cid, cls in sorted(registry.registered_codecs().items())
    }
    out["filters"] = sorted(registry.registered_filters())
    try:
        default = backends.requested_backend(None)
    except ValueError as exc:
        default = f"invalid: {exc}"
    out["backend"] = {"setting": default, "host_input": "cpu",
                      "device_input": "nvcomp" if reason is None else "cpu (copies to host)"}
    return out


def format_info(data: dict[str, Any] | None = None) -> str:
    data = info() if data is None else data
    lines = []
    for key, value in data.items():
        if key == "codecs":
            lines.append("codecs:")
            for cid, where in value.items():
                sides = "+".join(k for k in ("cpu", "gpu") if where[k])
                lines.append(f"  {cid:9s} {sides:8s} {'usable here' if where['usable_here'] else 'not usable here'}")
        elif isinstance(value, dict):
            lines.append(f"{key}:")
            lines.extend(f"  {k}: {v}" for k, v in value.items())
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)
