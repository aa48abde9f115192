"""The GPU fuzz campaign's machinery (benchmarks/fuzz_gpu.py), checked on the CPU.

Fake workers (small scripts that speak the campaign's line protocol) die, hang, report CUDA errors and write
compute-sanitizer records, so the driver's restart, timeout, budget and attribution logic runs for real without a
GPU. The real workers run end to end with ``--device cpu``.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import cupycodec as cc

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "fuzz_gpu.py"


def _load():
    spec = importlib.util.spec_from_file_location("fuzz_gpu_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


fz = _load()

FAKE_WORKER = textwrap.dedent(r'''
    import json, os, subprocess, sys, time
    start, stop, plan, log = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]

    def emit(**m):
        print("@@FUZZ " + json.dumps(m), flush=True)

    def sanitizer(text):
        with open(log, "a") as f:
            f.write(text)

    if plan.get("start") == "fail":
        sys.exit(3)
    if plan.get("start") == "exit":
        emit(event="ready", warmup="cuda_error")
        emit(event="exit", reason="dead")
        sys.exit(0)
    if plan.get("child"):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(plan["child"], "a") as f:
            f.write(f"{child.pid}\n")
    print("a library's own output", flush=True)
    emit(event="ready", warmup="same")
    errors = 0
    for t in range(start, stop):
        act = plan.get(str(t), "same")
        if act == "die":                # the brief's worker: reports some trials, then os._exit(1)
            os._exit(1)
        if act == "hang":
            time.sleep(600)
        if act == "skip":
            emit(event="trial", trial=t + 1, outcome="same", n_bytes=1)
            continue
        if act.startswith("memcheck"):  # memcheck records, flushed before the trial's report
            n = int(act[-1])
            sanitizer("========= Invalid __global__ write of size 4 bytes\n=========     at 0x70 in k()\n" * n)
            errors += n
            act = "cuda_error" if act.startswith("memcheck-die") else "same"
            if act == "cuda_error":
                os._exit(1)
        size = os.path.getsize(log) if log != "-" and os.path.exists(log) else 0
        emit(event="trial", trial=t, outcome=act, n_bytes=1, log_size=size)
        if act == "cuda_error":
            emit(event="exit", reason="dead")
            sys.exit(0)
    if log != "-":
        sanitizer(f"========= ERROR SUMMARY: {errors} errors\n")
    emit(event="done")
''')


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)

    def make(plan: dict, trials: int, *, timeout=20.0, startup_timeout=20.0, budget_s=60.0, sanitizer=False):
        starts = []

        def argv(start, log_path):
            starts.append(start)
            return [sys.executable, str(script), str(start), str(trials), json.dumps(plan), log_path or "-"]

        result = fz.run_case("fake", trials, argv, workdir=tmp_path, timeout=timeout, startup_timeout=startup_timeout,
                             deadline=time.monotonic() + budget_s, sanitizer=sanitizer, log=lambda *a: None)
        return result, starts

    return make


def _outcomes(result):
    return [(r["trial"], r["outcome"]) for r in result["records"]]


def _gone(pid: int, wait_s: float = 10.0) -> bool:
    """True once ``pid`` no longer runs (gone, or a zombie waiting for its parent)."""
    t = time.monotonic()
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except FileNotFoundError:
            return True
        if time.monotonic() - t > wait_s:
            return False
        time.sleep(0.05)


def test_driver_restarts_after_deaths_hangs_and_cuda_errors(fake):
    result, starts = fake({"2": "die", "5": "hang", "7": "cuda_error"}, 10, timeout=2.0)
    assert _outcomes(result) == [(0, "same"), (1, "same"), (2, "cuda_error"), (3, "same"), (4, "same"),
                                 (5, "hang"), (6, "same"), (7, "cuda_error"), (8, "same"), (9, "same")]
    assert starts == [0, 3, 6, 8] and result["restarts"] == 3
    assert result["counts"] == {"same": 7, "cuda_error": 2, "hang": 1}
    assert "worker died (exit status 1) without reporting" in result["records"][2]["error"]
    assert "no report within 2 s" in result["records"][5]["error"]
    assert [w["returncode"] for w in result["workers"]] == [1, -signal.SIGKILL, 0, 0]
    assert [w["died_on"] for w in result["workers"]] == [2, 5, None, None]
    assert result["error"] is None and result["stopped"] is None and result["warmup"]["outcome"] == "same"
    assert all(_gone(w["pid"], 0) for w in result["workers"])


def test_a_hung_worker_is_killed_with_its_children(fake, tmp_path):
    """compute-sanitizer runs the worker as its child: the kill must reach the whole process group."""
    pids = tmp_path / "children"
    result, _ = fake({"1": "hang", "child": str(pids)}, 3, timeout=1.5)
    assert _outcomes(result) == [(0, "same"), (1, "hang"), (2, "same")]
    first_child = int(pids.read_text().split()[0])
    assert _gone(first_child)


def test_a_worker_that_never_starts_stops_the_case(fake):
    result, starts = fake({"start": "fail"}, 5)
    assert starts == [0, 0, 0] and result["records"] == []
    assert "3 workers in a row made no progress" in result["error"] and "exit status 3" in result["error"]


def test_a_worker_that_dies_in_its_warmup_stops_the_case(fake):
    result, starts = fake({"start": "exit"}, 5)
    assert starts == [0, 0, 0] and result["records"] == []
    assert "exited before trial 0" in result["error"] and "cuda_error" in result["error"]


def test_a_worker_that_skips_a_trial_is_a_protocol_error(fake):
    result, _ = fake({"1": "skip"}, 4)
    assert _outcomes(result) == [(0, "same")] and "reported trial 2 while trial 1 was due" in result["error"]


def test_the_budget_stops_a_case_and_keeps_what_it_has(fake):
    t = time.monotonic()
    result, _ = fake({"2": "hang"}, 6, timeout=60.0, budget_s=3.0)
    assert time.monotonic() - t < 30
    assert _outcomes(result) == [(0, "same"), (1, "same")]  # the trial cut short is not called a hang
    assert result["stopped"] == "budget" and result["trials_run"] == 2


def test_sanitizer_errors_are_counted_and_attributed_to_trials(fake):
    result, _ = fake({"1": "memcheck2", "3": "memcheck-die1"}, 5, sanitizer=True)
    assert _outcomes(result) == [(0, "same"), (1, "same"), (2, "same"), (3, "cuda_error"), (4, "same")]
    san = result["sanitizer"]
    # The first worker died on trial 3 before its ERROR SUMMARY: its 3 records count; the second printed "0 errors".
    assert [w["sanitizer"] for w in result["workers"]] == [{"count": 3, "summary": None}, {"count": 0, "summary": 0}]
    assert san["errors"] == 3 and san["kinds"] == {"Invalid __global__ write": 3}
    assert san["by_trial"] == {"1": 2, "3": 1}
    assert [r["sanitizer_errors"] for r in result["records"]] == [0, 2, 0, 1, 0]
    assert all("log_size" not in r for r in result["records"])


SANITIZER_LOG = """\
========= COMPUTE-SANITIZER
========= Invalid __global__ write of size 4 bytes
=========     at 0x1a0 in void nvcomp::decode_kernel<int>(int*)
=========     by thread (31,0,0) in block (7,0,0)
=========     Address 0x7f3a00000400 is out of bounds
=========     and is 1 bytes after the nearest allocation at 0x7f3a00000000 of size 1024 bytes
=========     Saved host backtrace up to driver entry point at kernel launch time
=========         Host Frame: [0x2f3e1] in libcuda.so.1
=========
========= Invalid __global__ read of size 1 bytes
=========     at 0x2b0 in void nvcomp::decode_kernel<int>(int*)
=========
========= Program hit cudaErrorLaunchFailure (error 719) due to "unspecified launch failure" on CUDA API call to \
cudaStreamSynchronize.
=========     Saved host backtrace up to driver entry point at error
=========
========= Target application returned an error
========= ERROR SUMMARY: 3 errors
"""


def test_parse_sanitizer_log():
    parsed = fz.parse_sanitizer_log(SANITIZER_LOG)
    assert parsed["summary"] == 3 and parsed["count"] == 3 and parsed["notes"] == []
    assert [k for _, k in parsed["errors"]] == ["Invalid __global__ write", "Invalid __global__ read",
                                                "Program hit cudaErrorLaunchFailure"]
    offsets = [o for o, _ in parsed["errors"]]
    assert offsets == sorted(offsets) and SANITIZER_LOG.encode()[offsets[1]:].startswith(b"========= Invalid __global__ read")


def test_parse_sanitizer_log_without_summary_and_with_sanitizer_failures():
    died = SANITIZER_LOG.split("========= Target")[0]
    assert fz.parse_sanitizer_log(died)["count"] == 3 and fz.parse_sanitizer_log(died)["summary"] is None
    clean = "========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n"
    assert fz.parse_sanitizer_log(clean) == {"errors": [], "summary": 0, "notes": [], "count": 0}
    broken = "========= COMPUTE-SANITIZER\n========= Error: Device not supported\n"
    assert fz.parse_sanitizer_log(broken)["notes"] == ["Error: Device not supported"]
    assert fz.parse_sanitizer_log(b"")["count"] == 0


def test_attribute_errors():
    errors = [(10, "a"), (150, "b"), (160, "b"), (400, "c")]
    assert fz.attribute_errors(errors, [(0, 100), (1, 100), (2, 200)], died_on=3) == {0: 1, 2: 2, 3: 1}
    assert fz.attribute_errors(errors, [(0, 100)], died_on=None) == {0: 1, "after_last_trial": 3}


class CUDARuntimeError(RuntimeError):  # the name CuPy's class has
    pass


class FakeUntrustedError(cc.CupycodecError, ValueError):
    pass


class _CC:  # cupycodec as the worker sees it once the trust model exists
    FormatError, BackendError, UntrustedError = cc.FormatError, cc.BackendError, FakeUntrustedError


def test_classify_exception():
    classify = fz.classify_exception
    assert classify(CUDARuntimeError("cudaErrorIllegalAddress: an illegal memory access"), cc) == "cuda_error"
    assert classify(cc.BackendError("nvCOMP failed: cudaErrorLaunchFailure"), cc) == "cuda_error"
    wrapped = cc.BackendError("decode failed")
    wrapped.__cause__ = CUDARuntimeError("x")
    assert classify(wrapped, cc) == "cuda_error"
    assert classify(cc.BackendError("bad chunk", status="nvcompErrorInvalidValue"), cc) == "reported"
    assert classify(cc.ChecksumError("data", 1, 2), cc) == "reported"
    assert classify(FakeUntrustedError("pass trusted=True or key="), _CC) == "refused"
    assert classify(FakeUntrustedError("x"), cc) == "other_error"  # without the trust model it is foreign
    assert classify(ValueError("boom"), cc) == "other_error"
    assert classify(KeyError(3), _CC) == "other_error"


def test_same_array_compares_bytes_and_shape():
    import ml_dtypes
    import numpy as np

    bits = np.arange(6, dtype=np.uint16).reshape(2, 3)
    assert fz.same_array(bits.view(ml_dtypes.bfloat16), bits)
    assert not fz.same_array(bits.reshape(3, 2), bits)
    assert not fz.same_array(bits + 1, bits)


def test_report_table_and_default_mode_verdict():
    results = [
        {"case": "zstd-i32", "codec": "zstd", "data": "i32", "trials_requested": 4, "trials_run": 4,
         "counts": {"reported": 3, "silent_wrong": 1}, "records": [], "restarts": 0},
        {"case": "ans-i32", "codec": "ans", "data": "i32", "trials_requested": 4, "trials_run": 2, "stopped": "budget",
         "counts": {"cuda_error": 2}, "restarts": 2, "sanitizer": {"errors": 5},
         "records": [{"trial": 0, "outcome": "cuda_error", "error": "CUDARuntimeError: cudaErrorInvalidAddressSpace|x"}]},
        {"case": "lz4-bf16", "codec": "lz4", "data": "bf16", "trials_requested": 4, "trials_run": 0,
         "skipped": "only 0/8 chunks encoded"},
    ]
    table = fz.markdown_table(results, "trusted")
    lines = table.splitlines()
    assert lines[0] == "### mode: trusted" and len(lines) == 4 + 3
    assert "| zstd | i32 | 4/4 | 0 | 3 | 0 | 1 | 0 | 0 | 0 | 0 | - |  |" in table
    assert "| ans | i32 | 2/4 | 0 | 0 | 0 | 0 | 2 | 0 | 0 | 2 | 5 | (stopped: budget) CUDARuntimeError: " \
           "cudaErrorInvalidAddressSpace/x |" in table
    assert "only 0/8 chunks encoded" in table
    assert fz.default_mode_violations(results) == ["ans-i32: {'cuda_error': 2, 'sanitizer errors': 5}"]


def test_trial_blobs_are_reproducible_and_shared_by_both_modes():
    import numpy as np

    good = cc.compress(np.arange(4096, dtype=np.int32) % 977, codec="zstd", chunk_nbytes=1024).to_bytes()
    a, n = fz.trial_blob(good, "zstd-i32", 0, 7)
    assert 1 <= n <= 8 and (a, n) == fz.trial_blob(good, "zstd-i32", 0, 7)
    assert a != fz.trial_blob(good, "zstd-i32", 0, 8)[0] and a != fz.trial_blob(good, "zstd-bf16", 0, 7)[0]
    assert fz.trial_rng("zstd-i32", 0, 7)[1] == n
    cc.CompressedArray.from_bytes(a, verify=True).verify()


def _run_script(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def test_help_and_import_need_no_cupy():
    proc = _run_script("--help")
    assert proc.returncode == 0 and "--sanitizer" in proc.stdout and "--budget-s" in proc.stdout
    code = (f"import importlib.util, sys; s = importlib.util.spec_from_file_location('f', {str(SCRIPT)!r}); "
            "m = importlib.util.module_from_spec(s); sys.modules['f'] = m; s.loader.exec_module(m); "
            "assert 'cupy' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_bad_arguments_are_refused():
    assert _run_script("--codecs", "zstd,brotli").returncode == 2
    assert _run_script("--data", "f64").returncode == 2
    assert _run_script("--sanitizer", "--device", "cpu").returncode == 2


def test_campaign_end_to_end_on_the_cpu(tmp_path):
    """Real prepare step, real workers, host decoding: default mode shows only the allowed outcomes."""
    out = tmp_path / "fuzz.json"
    proc = _run_script("--device", "cpu", "--codecs", "zstd,gzip,lz4", "--trials", "12", "--mode", "default",
                       "--workdir", str(tmp_path / "work"), "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "### mode: default" in proc.stdout and "default mode: OK" in proc.stdout
    doc = json.loads(out.read_text())
    results = doc["results"]["default"]
    assert {r["case"] for r in results} == {"zstd-bf16", "zstd-i32", "gzip-bf16", "gzip-i32", "lz4-bf16", "lz4-i32"}
    run = [r for r in results if "skipped" not in r]
    assert {r["case"] for r in run} >= {"zstd-i32", "gzip-i32", "lz4-i32"}
    for r in run:
        assert r["trials_run"] == 12 and r["restarts"] == 0 and r["warmup"]["outcome"] == "same"
        assert set(r["counts"]) <= {"reported", "same", "silent_wrong"}
        assert all(1 <= rec["n_bytes"] <= 8 for rec in r["records"])
    assert next(r for r in results if r["case"] == "gzip-i32")["counts"] == {"reported": 12}  # gzip's own CRC32


def test_cases_of_both_modes_run_at_once_and_report_like_one_at_a_time(tmp_path):
    """--jobs runs cases concurrently: both modes of one case at once must not share worker files, and the
    records must be those of a serial run (each trial's blob depends on (seed, case, trial) only)."""
    docs = {}
    for jobs in ("1", "4"):
        out = tmp_path / f"fuzz{jobs}.json"
        proc = _run_script("--device", "cpu", "--codecs", "zstd,gzip", "--data", "i32", "--trials", "6", "--jobs", jobs,
                           "--workdir", str(tmp_path / f"work{jobs}"), "--json", str(out))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        docs[jobs] = json.loads(out.read_text())["results"]
    for mode in ("default", "trusted"):
        serial, parallel = docs["1"][mode], docs["4"][mode]
        assert [r["case"] for r in serial] == [r["case"] for r in parallel] == ["zstd-i32", "gzip-i32"]
        for a, b in zip(serial, parallel):
            assert b["trials_run"] == 6 and b["restarts"] == 0
            assert [(x["trial"], x["outcome"]) for x in a["records"]] == [(x["trial"], x["outcome"]) for x in b["records"]]
    assert len(list((tmp_path / "work4").glob("*.stderr"))) == 4  # one worker per case and mode, none overwritten


def _trust_model() -> bool:
    return hasattr(cc, "UntrustedError") and "trusted" in inspect.signature(cc.CompressedArray.from_bytes).parameters


@pytest.mark.skipif(not _trust_model(), reason="the trust model (from_bytes(trusted=...), UntrustedError) is not here")
@pytest.mark.skipif(not cc.get_codec("gdeflate").cpu_usable(), reason="needs nvCOMP's host libraries")
def test_untrusted_nvidia_formats_are_refused_on_the_cpu_end_to_end(tmp_path):
    """Before the trust model, nvCOMP's host GDeflate aborted the worker on most crafted blobs (SIGABRT from an
    uncaught C++ exception); untrusted gdeflate/bitcomp must now be refused without ever reaching it."""
    out = tmp_path / "fuzz.json"
    proc = _run_script("--device", "cpu", "--codecs", "gdeflate,bitcomp", "--data", "i32", "--trials", "20",
                       "--mode", "default", "--workdir", str(tmp_path / "work"), "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for r in json.loads(out.read_text())["results"]["default"]:
        assert r["counts"] == {"refused": 20} and r["restarts"] == 0, r["case"]


@pytest.mark.skipif(not _trust_model(), reason="the trust model (from_bytes(trusted=...), UntrustedError) is not here")
def test_campaign_trusted_mode_on_the_cpu(tmp_path):
    out = tmp_path / "fuzz.json"
    proc = _run_script("--device", "cpu", "--codecs", "zstd,snappy", "--data", "i32", "--trials", "10",
                       "--mode", "trusted", "--workdir", str(tmp_path / "work"), "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for r in json.loads(out.read_text())["results"]["trusted"]:
        assert r["warmup"]["outcome"] == "same" and set(r["counts"]) <= {"reported", "same", "silent_wrong"}
