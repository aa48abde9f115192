"""The command line and the examples, run as a user would."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import cupycodec as cc
from cupycodec.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_info(capsys):
    assert main(["info"]) == 0
    assert "codecs:" in capsys.readouterr().out
    assert main(["info", "--json"]) == 0
    assert '"cupycodec"' in capsys.readouterr().out


def test_compress_decompress_inspect(tmp_path, capsys):
    x = np.arange(10000, dtype=np.float32).reshape(100, 100)
    np.save(tmp_path / "x.npy", x)
    assert main(["compress", str(tmp_path / "x.npy"), str(tmp_path / "x.cc"), "--codec", "zstd", "--level", "5"]) == 0
    assert cc.load(tmp_path / "x.cc").codecs["data"]["level"] == 5
    assert main(["decompress", str(tmp_path / "x.cc"), str(tmp_path / "y.npy")]) == 0
    assert np.array_equal(np.load(tmp_path / "y.npy"), x)
    assert main(["inspect", str(tmp_path / "x.cc")]) == 0
    assert '"segments"' in capsys.readouterr().out


def test_bf16_through_npy_bits(tmp_path, capsys):
    bits = (np.arange(100, dtype=np.uint16) + 16000)
    np.save(tmp_path / "b.npy", bits)
    assert main(["compress", str(tmp_path / "b.npy"), str(tmp_path / "b.cc"), "--dtype", "bfloat16"]) == 0
    assert cc.load(tmp_path / "b.cc").dtype_name == "BF16"
    assert main(["decompress", str(tmp_path / "b.cc"), str(tmp_path / "o.npy")]) == 0
    assert "16-bit unsigned" in capsys.readouterr().out
    assert np.array_equal(np.load(tmp_path / "o.npy"), bits)


def test_errors_are_reported_not_raised(tmp_path, capsys):
    (tmp_path / "bad.cc").write_bytes(b"not a container at all, clearly")
    assert main(["decompress", str(tmp_path / "bad.cc"), str(tmp_path / "o.npy")]) == 2
    assert "not a cupycodec container" in capsys.readouterr().err
    assert main(["compress", str(tmp_path / "missing.npy"), str(tmp_path / "o.cc")]) == 2


def test_demo_runs_on_synthetic_data(capsys, monkeypatch):
    monkeypatch.setattr("cupycodec.bench._minilm_path", lambda: None)
    assert main(["demo", "--size-mib", "1", "--repeat", "1", "--cpu-only", "--codecs", "zstd", "auto"]) == 0
    out = capsys.readouterr().out
    assert "synthetic weight-like data" in out and "byteplane+zstd" in out


@pytest.mark.parametrize("script", ["compress_arrays.py"])
def test_examples_run(script):
    subprocess.run([sys.executable, os.path.join(ROOT, "examples", script)], check=True, capture_output=True,
                   timeout=300)


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "cupycodec", "info"], check=True, capture_output=True, text=True)
    assert "cupycodec:" in out.stdout
