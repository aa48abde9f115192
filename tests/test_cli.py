"""The command line and the examples, run as a user would."""

from __future__ import annotations

import copy
import os
import re
import stat
import subprocess
import sys

import ml_dtypes
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


def test_output_names_as_long_as_the_file_system_takes(tmp_path):
    # the temporary file beside the output is named after it, cut to fit the file system's limit on a name
    x = np.arange(100, dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    packed, out = tmp_path / ("c" * 252 + ".cc"), tmp_path / ("y" * 251 + ".npy")
    assert main(["compress", str(tmp_path / "x.npy"), str(packed)]) == 0
    assert main(["decompress", str(packed), str(out)]) == 0
    assert np.array_equal(np.load(out), x)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([packed.name, out.name, "x.npy"])


def test_inspect_checks_the_chunk_crcs_unless_told_not_to(tmp_path, capsys):
    """inspect loaded with verify=True, which only defers the chunk CRCs to a decode that inspect never runs: a
    corrupt file printed its header and exited 0, and --no-verify changed nothing."""
    c = cc.compress(np.arange(50000, dtype=np.float32), codec="zstd")
    blob = bytearray(c.to_bytes())
    blob[-100] ^= 0xFF  # inside the last chunk's compressed bytes
    (tmp_path / "bad.cc").write_bytes(bytes(blob))
    assert main(["inspect", str(tmp_path / "bad.cc")]) == 2
    captured = capsys.readouterr()
    assert '"segments"' in captured.out and "checksum mismatch" in captured.err
    assert main(["inspect", str(tmp_path / "bad.cc"), "--no-verify"]) == 0
    assert "CRC" not in capsys.readouterr().out
    cc.save(tmp_path / "good.cc", c)
    assert main(["inspect", str(tmp_path / "good.cc")]) == 0
    assert "every chunk CRC matches" in capsys.readouterr().out


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
    assert main(["demo", "--size-mib", "1", "--repeat", "1", "--cpu-only", "--codecs", "zstd", "auto",
                 "--no-llm"]) == 0
    out = capsys.readouterr().out
    assert "synthetic weight-like data" in out and "byteplane+zstd" in out and "PyTorch" not in out


@pytest.mark.torch
def test_demo_shows_the_torch_integration(capsys, monkeypatch):
    transformers = pytest.importorskip("transformers")
    import torch

    from cupycodec.integrations.torch import compress_model, demo

    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    # fast (SmolLM2 runs in its own tests); from_config keeps the rotary buffers in float32, as from_pretrained
    # builds them, so the demo's saved-and-reloaded model computes what this one does
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    monkeypatch.setattr(demo, "load_model", lambda **kw: (model, None, "a tiny random Llama"))
    monkeypatch.setattr("cupycodec.bench._minilm_path", lambda: None)
    assert main(["demo", "--size-mib", "1", "--repeat", "1", "--cpu-only", "--codecs", "raw"]) == 0
    out = capsys.readouterr().out
    assert "PyTorch: compress_model on" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] in (["lossless"], ["int8"])}
    assert "identical" in lines["lossless"] and " yes " in lines["lossless"]
    assert "checkpoint: save_compressed wrote" in out
    loaded = next(line for line in out.splitlines() if line.startswith("lossless, loaded"))
    assert "identical" in loaded and " yes " in loaded
    # the table's ratio is the report's: the Linear weights compress_model takes, not the head it leaves alone
    # (SmolLM2's table read 1.35x where its report says 1.49x)
    head = model.lm_head.weight.numel() * 2
    report = compress_model(copy.deepcopy(model), "lossless", progress=False)
    assert demo.linear_weight_nbytes(model) == report.original_nbytes
    table_ratio = float(lines["lossless"].split()[3])
    assert table_ratio == pytest.approx(report.ratio, abs=1e-3)
    assert table_ratio != pytest.approx((report.original_nbytes + head) / (report.compressed_nbytes + head), abs=1e-3)


@pytest.mark.parametrize("argv,match", [
    (["--modes", "bogus"], "invalid choice: 'bogus'"), (["--tokens", "0"], "must be at least 1"),
    (["--model", "x", "--config", "llama-1b"], "not allowed with argument"),
    (["--device", "cuda:7"], "no such CUDA device here"), (["--device", "tpu9"], "--device 'tpu9'"),
    (["--model", "/nonexistent/model"], "not a model directory")])
def test_llm_example_refuses_bad_arguments_before_loading_anything(argv, match):
    """They failed with tracebacks after the model had loaded and the baseline had run (minutes at 7B)."""
    if "cuda" in argv[-1] and torch_cuda_devices() > 7:
        pytest.skip("this machine has a cuda:7")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "llm_inference.py"), *argv],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and match in proc.stderr and "baseline" not in proc.stdout


def torch_cuda_devices() -> int:
    torch = pytest.importorskip("torch")
    return torch.cuda.device_count()


@pytest.mark.parametrize("script", ["compress_arrays.py"])
def test_examples_run(script):
    subprocess.run([sys.executable, os.path.join(ROOT, "examples", script)], check=True, capture_output=True,
                   timeout=300)


@pytest.mark.parametrize("script", ["compress_arrays.py", "llm_inference.py", "dask_zarr.py"])
def test_every_example_answers_help_without_running(script):
    # compress_arrays.py had no parser: --help ran the whole example
    for needed in {"llm_inference.py": ["torch", "transformers"], "dask_zarr.py": ["dask", "zarr"]}.get(script, []):
        pytest.importorskip(needed)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), "--help"], check=True,
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("usage:") and "ratio" not in out.stdout  # compress_arrays prints ratios


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "cupycodec", "info"], check=True, capture_output=True, text=True)
    assert "cupycodec:" in out.stdout


def test_files_get_the_permissions_a_plain_write_gives(tmp_path):
    x = np.arange(100, dtype=np.int32)
    np.save(tmp_path / "x.npy", x)
    old = os.umask(0o022)
    try:
        cc.save(tmp_path / "a.cc", cc.compress(x))
        assert (os.stat(tmp_path / "a.cc").st_mode & 0o777) == 0o644  # what np.save and open() give
        os.chmod(tmp_path / "a.cc", 0o640)
        cc.save(tmp_path / "a.cc", cc.compress(x + 1))  # overwriting keeps the file's mode
        assert (os.stat(tmp_path / "a.cc").st_mode & 0o777) == 0o640
        assert main(["decompress", str(tmp_path / "a.cc"), str(tmp_path / "y.npy")]) == 0
        assert (os.stat(tmp_path / "y.npy").st_mode & 0o777) == 0o644
    finally:
        os.umask(old)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs: POSIX")
def test_files_that_are_not_regular_are_refused_at_once_both_ways(tmp_path, capsys):
    """Reading a FIFO with no writer used to wait forever (open() blocks for a writer); writing over a FIFO, a
    device or a directory replaced it with a regular file, or failed naming a temporary file."""
    x = np.arange(10, dtype=np.int32)
    cc.save(tmp_path / "x.cc", cc.compress(x))
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    with pytest.raises(ValueError, match="not a regular file"):
        cc.load(tmp_path / "fifo")  # returns at once: no writer needed
    assert main(["inspect", str(tmp_path / "fifo")]) == 2
    for target in ("fifo", "dir"):
        with pytest.raises(ValueError, match=f"'{tmp_path / target}' is not a regular file.*name a file path"):
            cc.save(tmp_path / target, cc.compress(x))
        assert main(["decompress", str(tmp_path / "x.cc"), str(tmp_path / target)]) == 2
        assert "is not a regular file" in capsys.readouterr().err
    assert stat.S_ISFIFO(os.stat(tmp_path / "fifo").st_mode) and (tmp_path / "dir").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "fifo", "x.cc"]  # no temporary file left


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="symbolic links")
def test_a_symbolic_link_is_written_through_to_its_target(tmp_path):
    x = np.arange(10, dtype=np.int32)
    cc.save(tmp_path / "real.cc", cc.compress(x))
    os.symlink("real.cc", tmp_path / "link.cc")
    cc.save(tmp_path / "link.cc", cc.compress(x * 2))  # as open(link, "wb") would: the link stays, the target changes
    assert os.path.islink(tmp_path / "link.cc")
    assert np.array_equal(cc.decompress(cc.load(tmp_path / "real.cc")), x * 2)
    os.symlink("new.cc", tmp_path / "dangling.cc")
    cc.save(tmp_path / "dangling.cc", cc.compress(x))
    assert os.path.islink(tmp_path / "dangling.cc") and np.array_equal(cc.decompress(cc.load(tmp_path / "new.cc")), x)


def test_numbers_that_must_be_positive_are_checked_by_the_parser(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.arange(256, dtype=np.float32).reshape(2, 128))
    for argv in (["compress", str(tmp_path / "x.npy"), str(tmp_path / "x.cc"), "--quantize", "int8",
                  "--granularity", "group", "--group-size", "0"],  # stored as 128 before
                 ["compress", str(tmp_path / "x.npy"), str(tmp_path / "x.cc"), "--group-size", "0"],
                 ["bench", "--repeat", "0"], ["demo", "--size-mib", "-1"], ["demo", "--codecs", "nope"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert re.search(r"must be greater than 0|invalid choice: 'nope'|apply to --quantize", capsys.readouterr().err)
    assert not (tmp_path / "x.cc").exists()


def test_a_npy_of_ml_dtypes_bfloat16_compresses_with_its_dtype_named(tmp_path, capsys):
    """numpy.save writes ml_dtypes' bfloat16 as raw 2-byte records (|V2); --dtype names what they hold."""
    x = (np.arange(64, dtype=np.float32) / 7).astype(ml_dtypes.bfloat16)
    np.save(tmp_path / "w.npy", x)
    assert main(["compress", str(tmp_path / "w.npy"), str(tmp_path / "w.cc")]) == 2
    err = capsys.readouterr().err
    assert "raw 2-byte records (|V2)" in err and "--dtype bfloat16" in err
    assert main(["compress", str(tmp_path / "w.npy"), str(tmp_path / "w.cc"), "--dtype", "bfloat16"]) == 0
    y = cc.decompress(cc.load(tmp_path / "w.cc"))
    assert y.dtype == x.dtype and np.array_equal(y.view(np.uint16), x.view(np.uint16))


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    """``cupycodec inspect x.cc | head`` printed "error: [Errno 32] Broken pipe" and returned 2."""
    cc.save(tmp_path / "x.cc", cc.compress(np.arange(10)))
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first write
    try:
        proc = subprocess.run([sys.executable, "-m", "cupycodec", "inspect", str(tmp_path / "x.cc")], stdout=w,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(w)
    assert proc.returncode == 1 and proc.stderr == ""


def test_decompress_writes_exactly_the_given_path_atomically(tmp_path, capsys, monkeypatch):
    x = np.arange(1000, dtype=np.float64)
    cc.save(tmp_path / "x.cc", cc.compress(x))
    assert main(["decompress", str(tmp_path / "x.cc"), str(tmp_path / "out")]) == 0
    assert "-> " + str(tmp_path / "out") in capsys.readouterr().out
    assert np.array_equal(np.load(tmp_path / "out"), x) and not (tmp_path / "out.npy").exists()

    def boom(*args, **kwargs):  # a full disk, or a signal, half-way through the write
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np.lib.format, "write_array", boom)
    assert main(["decompress", str(tmp_path / "x.cc"), str(tmp_path / "new.npy")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "x.cc"]  # nothing half-written left behind


_TERM_DURING_WRITE = """
import os, signal, sys
import numpy as np
from cupycodec.__main__ import main
write_array = np.lib.format.write_array
def slow(f, *args, **kwargs):  # SIGTERM arrives half-way through the write (its temporary file made)
    os.kill(os.getpid(), signal.SIGTERM)
    return write_array(f, *args, **kwargs)
np.lib.format.write_array = slow
before = signal.getsignal(signal.SIGTERM)
rc = main(sys.argv[1:])
print("restored" if signal.getsignal(signal.SIGTERM) is before else "not restored")
sys.exit(rc)
"""


def test_sigterm_during_a_write_leaves_no_temporary_file(tmp_path):
    # SIGTERM (a service manager, kill, a job's timeout) ends the CLI as Ctrl-C does: the atomic write removes its
    # temporary file, and the exit status is 128 + 15; the handler it had before main() is put back
    cc.save(tmp_path / "x.cc", cc.compress(np.arange(1000, dtype=np.float64)))
    proc = subprocess.run([sys.executable, "-c", _TERM_DURING_WRITE, "decompress", str(tmp_path / "x.cc"),
                           str(tmp_path / "out.npy")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 128 + 15, proc.stderr
    assert proc.stderr == "cupycodec decompress: terminated\n" and proc.stdout == "restored\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.cc"]


def test_sigterm_is_left_ignored_where_it_was(tmp_path):
    import signal

    cc.save(tmp_path / "x.cc", cc.compress(np.arange(1000, dtype=np.float64)))
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        code = _TERM_DURING_WRITE.replace("before = ", "signal.signal(signal.SIGTERM, signal.SIG_IGN); before = ")
        proc = subprocess.run([sys.executable, "-c", code, "decompress", str(tmp_path / "x.cc"),
                               str(tmp_path / "out.npy")], capture_output=True, text=True, timeout=120)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert proc.returncode == 0 and proc.stdout.endswith("restored\n"), proc.stderr
    assert np.array_equal(np.load(tmp_path / "out.npy"), np.arange(1000, dtype=np.float64))


def test_cli_reports_user_errors_plainly(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("1,2,3\n")
    assert main(["compress", str(tmp_path / "x.txt"), str(tmp_path / "x.cc")]) == 2
    assert "is not a .npy file" in capsys.readouterr().err
    np.save(tmp_path / "x.npy", np.zeros(1 << 18, np.uint8))
    with pytest.raises(SystemExit):
        main(["compress", str(tmp_path / "x.npy"), str(tmp_path / "x.cc"), "--granularity", "group"])
    assert "--quantize int8 only" in capsys.readouterr().err
    assert main(["compress", str(tmp_path / "x.npy"), str(tmp_path / "x.cc"), "--codec", "zstd"]) == 0
    capsys.readouterr()
    assert main(["decompress", str(tmp_path / "x.cc"), str(tmp_path / "y.npy"), "--max-output-nbytes", "1000"]) == 2
    err = capsys.readouterr().err
    assert "--max-output-nbytes" in err and "max_output_nbytes=None" not in err
    with pytest.raises(SystemExit):  # named as the flag, not as the keyword argument
        main(["decompress", str(tmp_path / "x.cc"), str(tmp_path / "y.npy"), "--max-output-nbytes", "-1"])
    assert "--max-output-nbytes: must be 0 or more, got -1" in capsys.readouterr().err
    if os.path.exists("/dev/zero"):
        assert main(["inspect", "/dev/zero"]) == 2
        assert "not a regular file" in capsys.readouterr().err
        with pytest.raises(ValueError, match="not a regular file"):
            cc.load("/dev/zero")


def test_bench_on_cuda_without_a_gpu_says_why(capsys):
    from cupycodec import backends

    if backends.nvcomp_available():
        pytest.skip("a GPU with nvCOMP is present")
    assert main(["bench", "--device", "cuda", "--size-mib", "1"]) == 2
    assert "cannot run here" in capsys.readouterr().err


def test_help_texts_name_choices_and_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    out = capsys.readouterr().out
    assert "zstd" in out and "default: auto" in out and "512 KiB for floats" in out and "``" not in out
    with pytest.raises(SystemExit):
        main(["decompress", "--help"])
    assert "1024 x the file's size" in capsys.readouterr().out


# --- a bug hunt of 2026-12-04: a FIFO to compress, outputs that are the input, a directory, a read-only file ------

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs")
def test_compress_refuses_a_fifo_at_once(tmp_path, capsys):
    os.mkfifo(tmp_path / "in.npy")  # no writer: open() would wait for one forever
    assert main(["compress", str(tmp_path / "in.npy"), str(tmp_path / "out.cc")]) == 2
    assert "is not a regular file" in capsys.readouterr().err


def test_an_output_that_is_the_input_is_refused(tmp_path, capsys):
    x = np.arange(10, dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    before = (tmp_path / "x.npy").read_bytes()
    assert main(["compress", str(tmp_path / "x.npy"), str(tmp_path / "x.npy")]) == 2
    assert "is the input file" in capsys.readouterr().err and (tmp_path / "x.npy").read_bytes() == before
    cc.save(tmp_path / "x.cc", cc.compress(x))
    if hasattr(os, "symlink"):
        os.symlink("x.cc", tmp_path / "link.cc")
        assert main(["decompress", str(tmp_path / "x.cc"), str(tmp_path / "link.cc")]) == 2
        assert "is the input file" in capsys.readouterr().err


def test_an_output_path_ending_in_a_separator_names_a_directory(tmp_path, capsys):
    x = np.arange(10, dtype=np.float32)
    with pytest.raises(IsADirectoryError, match="names a directory"):
        cc.save(str(tmp_path / "lib") + os.sep, cc.compress(x))
    np.save(tmp_path / "x.npy", x)
    assert main(["compress", str(tmp_path / "x.npy"), str(tmp_path / "out") + os.sep]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]  # no file named 'out' or 'lib'


def test_errors_name_the_callers_paths_not_a_temporary_file(tmp_path):
    x = cc.compress(np.arange(10, dtype=np.float32))
    with pytest.raises(FileNotFoundError, match="No such directory") as info:
        cc.save(tmp_path / "missing" / "x.cc", x)
    assert ".tmp" not in str(info.value)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes read-only files")
def test_a_read_only_file_is_not_replaced(tmp_path):
    """A plain write fails on a 0444 file; a rename over it (the atomic write) did not, and replaced it."""
    path = tmp_path / "keep.cc"
    path.write_bytes(b"keep")
    path.chmod(0o444)
    with pytest.raises(PermissionError, match="not writable"):
        cc.save(path, cc.compress(np.arange(10, dtype=np.float32)))
    assert path.read_bytes() == b"keep"


def test_new_files_get_what_a_plain_open_gives_whatever_the_writer_does(tmp_path):
    """safetensors writes a file of its own, as 0600: checkpoints were 0600 beside a 0644 config.json."""
    from cupycodec._files import atomic_write_path

    def write(name):
        os.unlink(name)
        fd = os.open(name, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)

    old = os.umask(0o022)
    try:
        atomic_write_path(tmp_path / "f", write)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "f").st_mode) == 0o644


def test_bench_json_is_strict_json_when_a_codec_cannot_run(tmp_path):
    """A codec that could not run had "ratio": Infinity, which strict JSON parsers refuse, and a note cut mid-word
    (on a GPU machine with nvCOMP, ans runs and has a ratio)."""
    import json

    out = tmp_path / "b.json"
    main(["bench", "--codecs", "ans", "raw", "--size-mib", "0.25", "--json", str(out)])

    def strict(name):
        raise ValueError(f"not strict JSON: {name}")

    rows = json.loads(out.read_text(), parse_constant=strict)
    ans = [r for r in rows if r["codec"] == "ans"]
    assert ans and all(r["ratio"] is None and r["note"].endswith("[cu13])") for r in ans if r["nbytes"] == 0)
    assert all(r["ratio"] > 0 for r in rows if r["codec"] == "raw")


def test_bad_sizes_unreadable_npy_and_json_paths_are_one_line_errors_before_the_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--size-mib", "inf"])
    assert "must be greater than 0 and finite" in capsys.readouterr().err
    # --json into a missing directory: refused before the run (it failed only after the whole run before)
    assert main(["bench", "--size-mib", "0.25", "--codecs", "raw", "--json", str(tmp_path / "no" / "b.json")]) == 2
    err = capsys.readouterr()
    assert "no directory" in err.err and "raw" not in err.out
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert main(["compress", str(tmp_path / "obj.npy"), str(tmp_path / "o.cc")]) == 2
    assert "obj.npy: cannot read it as a .npy array" in capsys.readouterr().err


def test_empty_paths_tiny_benches_and_odd_records_are_refused_before_the_work(tmp_path, capsys, monkeypatch):
    # an empty OUTPUT was compressed first, then failed naming a hidden file beside the working directory; --json ''
    # wrote nothing and exited 0; a bench of 1e-9 MiB printed a table of an empty array; 3-byte records with
    # --dtype uint8 gave NumPy's "data type 'u3' not understood"
    from cupycodec.__main__ import main

    np.save(tmp_path / "x.npy", np.arange(10, dtype=np.float32))
    monkeypatch.setattr(cc, "compress", lambda *a, **k: pytest.fail("compressed before refusing"))
    assert main(["compress", str(tmp_path / "x.npy"), ""]) == 2
    assert "OUTPUT '': give a file or directory name" in capsys.readouterr().err
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="an empty path"):
        cc.save("", cc.compress(np.zeros(4, np.float32)))
    assert main(["bench", "--size-mib", "1e-9", "--json", str(tmp_path / "b.json")]) == 2
    assert "less than one bfloat16 value" in capsys.readouterr().err
    assert main(["bench", "--size-mib", "0.01", "--json", ""]) == 2
    assert "--json '': give a file name" in capsys.readouterr().err
    np.save(tmp_path / "v3.npy", np.zeros(4, dtype="V3"))
    assert main(["compress", str(tmp_path / "v3.npy"), str(tmp_path / "v.cc"), "--dtype", "uint8"]) == 2
    assert "3-byte records (|V3), which no dtype cupycodec stores has" in capsys.readouterr().err


def test_a_file_name_that_is_not_utf8_is_printed_and_a_directory_input_named(tmp_path, capsys):
    # the container was written, then the success line failed to encode under a strict UTF-8 stdout (exit 2); a
    # non-regular input was told that cupycodec reads containers, through CompressedArray.from_bytes
    np.save(tmp_path / "in.npy", np.arange(6, dtype=np.float32))
    out = os.path.join(os.fsencode(tmp_path), b"out\xfe.cc")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([sys.executable, "-m", "cupycodec", "compress", str(tmp_path / "in.npy"), os.fsdecode(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "out\\xfe.cc" in proc.stdout, proc.stderr
    assert np.array_equal(cc.decompress(cc.load(out)), np.arange(6, dtype=np.float32))
    assert main(["compress", str(tmp_path), str(tmp_path / "x.cc")]) == 2
    assert "cupycodec reads .npy arrays from files (save the array with numpy.save" in capsys.readouterr().err
