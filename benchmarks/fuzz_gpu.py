"""GPU fuzz campaign: crafted containers (1-8 payload bytes changed, every CRC recomputed) against the decoders.

CRC32 only catches accidents; an attacker recomputes it (tests/fuzzing.py does what they do). For every codec this
script compresses a realistic 512 KiB array on the GPU (bf16 weights ``0.02 * standard_t(5)`` and int32
``arange % 977`` plus noise; a case whose chunks are mostly stored is skipped, since it would not reach the decoder),
then decodes N crafted variants of it, each in a worker subprocess, and classifies every trial:

* ``refused``      cc.UntrustedError (default mode: an NVIDIA-only codec is not decoded for untrusted bytes)
* ``reported``     cc.FormatError or cc.BackendError: the decoder noticed
* ``same``         no error and the original array (the change hit a byte that does not matter)
* ``silent_wrong`` no error and a different array
* ``cuda_error``   a CUDA error (CuPy's CUDARuntimeError/CUDADriverError, anything naming cudaError, a failed health
                   check after the trial) or a worker that died without reporting: the CUDA context is dead
* ``hang``         no report within ``--timeout`` seconds: the worker is killed
* ``other_error``  any other exception (a bug in cupycodec's error handling)

Modes: ``trusted`` decodes ``cc.CompressedArray.from_bytes(blob, trusted=True)`` with ``device="cuda"`` (nvCOMP sees
the crafted bytes; this measures the decoders), ``default`` decodes ``from_bytes(blob)`` (untrusted: decoded on the
CPU and uploaded, or refused). Default mode must show only refused/reported/same/silent_wrong; anything else there
(or any compute-sanitizer error) is a bug and makes the script exit with status 1.

A CUDA error kills the process's context, so trials run in a worker subprocess that prints one JSON line per trial;
the driver starts a new worker at the next trial after a death or a timeout. ``--sanitizer`` runs each worker (not
the prepare step, which compresses) under ``compute-sanitizer --tool memcheck`` with its own log file, counts the
errors per case (the log's ERROR SUMMARY, else its error records) and attributes them to trials by the log's size
that the worker measures after each trial (best effort: the sanitizer may write late). Each trial's blob is
reproducible from (seed, case, trial); ``--save-blobs`` writes the blobs of trials that died, hung, raised a foreign
error or drew sanitizer reports into the work directory.

Usage (from the repository root, on a machine with CuPy, nvCOMP and a GPU):

    PYTHONPATH=. python benchmarks/fuzz_gpu.py --json fuzz.json                   # both modes, 300 trials per case
    PYTHONPATH=. python benchmarks/fuzz_gpu.py --sanitizer --trials 20 --json fuzz-memcheck.json
    PYTHONPATH=. python benchmarks/fuzz_gpu.py --codecs zstd,ans --mode trusted --trials 50

Duration (estimated from the costs, not measured on a GPU yet): a trial that reports costs a few ms; a restart after
a CUDA error costs a new process, CuPy import and CUDA context (about 2-3 s; ANS, which the H200 measurement showed
killing the context on every crafted input, restarts on every trial). Default mode takes a minute or two; trusted
mode is capped by ``--budget-s`` (default 1200 s for the whole run, shared fairly between the cases, unused time
passing on to later ones). Under compute-sanitizer everything is about 10x slower; use ``--trials 20``.

``--device cpu`` runs the same harness with host decoding (no GPU needed; a worker that dies, e.g. nvCOMP's host
GDeflate aborting on a C++ exception, still lands in the ``cuda_error`` column): the tests use it to check the driver
and the workers end to end.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import functools
import importlib.util
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CODECS = ["raw", "lz4", "snappy", "gdeflate", "deflate", "zstd", "gzip", "cascaded", "bitcomp", "ans"]
DATASETS = ["bf16", "i32"]
OUTCOMES = ["refused", "reported", "same", "silent_wrong", "cuda_error", "hang", "other_error"]
BAD_IN_DEFAULT_MODE = ("cuda_error", "hang", "other_error")
ARRAY_NBYTES = 512 * 1024
TAG = "@@FUZZ "
_MAX_IDLE_WORKERS = 3


@functools.cache
def fuzzing():
    """tests/fuzzing.py (recompute_crcs, mutate), loaded by path: the single copy of the crafting logic."""
    name = "cupycodec_tests_fuzzing"
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "fuzzing.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def make_array(data: str, nbytes: int = ARRAY_NBYTES) -> tuple[np.ndarray, str | None]:
    """The host array of a dataset and the ``dtype=`` override to compress it with."""
    rng = np.random.default_rng(20261127)
    if data == "bf16":
        import ml_dtypes

        w = (0.02 * rng.standard_t(5, nbytes // 2)).astype(np.float32).astype(ml_dtypes.bfloat16)
        return w.view(np.uint16).reshape(-1, 512), "bfloat16"
    if data == "i32":
        n = nbytes // 4
        return ((np.arange(n) % 977) + rng.integers(0, 8, n)).astype(np.int32).reshape(-1, 256), None
    raise ValueError(f"unknown dataset {data!r}; choose from {DATASETS}")


def trial_rng(case: str, seed: int, trial: int) -> tuple[np.random.Generator, int]:
    """The generator of one trial (the same in both modes) and how many bytes (1-8) it changes."""
    rng = np.random.default_rng([seed, zlib.crc32(case.encode()), trial])
    return rng, int(rng.integers(1, 9))


def trial_blob(good: bytes, case: str, seed: int, trial: int) -> tuple[bytes, int]:
    """The crafted blob of one trial (deterministic in seed, case and trial) and how many bytes it changes."""
    rng, n_bytes = trial_rng(case, seed, trial)
    return fuzzing().mutate(good, rng, n_bytes), n_bytes


def _emit(event: str, **fields) -> None:
    sys.stdout.write(TAG + json.dumps({"event": event, **fields}, default=str) + "\n")
    sys.stdout.flush()


def _message(exc: BaseException, limit: int = 500) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------------------
# classification (runs in the worker; pure, so the CPU tests check it)
# --------------------------------------------------------------------------------------------------------------


def is_cuda_error(exc: BaseException) -> bool:
    """A CUDA runtime/driver error anywhere in the exception's chain (the context is then unusable)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ in ("CUDARuntimeError", "CUDADriverError") or "cudaError" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def classify_exception(exc: BaseException, cc) -> str:
    if is_cuda_error(exc):
        return "cuda_error"
    untrusted = getattr(cc, "UntrustedError", None)
    if untrusted is not None and isinstance(exc, untrusted):
        return "refused"
    if isinstance(exc, (cc.FormatError, cc.BackendError)):
        return "reported"
    return "other_error"


def same_array(host: np.ndarray, original: np.ndarray) -> bool:
    """Same shape and bytes (a BF16 result may be uint16 bits or ml_dtypes bfloat16: the bytes decide)."""
    host = np.ascontiguousarray(host)
    return host.shape == original.shape and host.reshape(-1).view(np.uint8).tobytes() == original.tobytes()


# --------------------------------------------------------------------------------------------------------------
# prepare and worker (subprocesses)
# --------------------------------------------------------------------------------------------------------------


def prepare_main(args) -> int:
    """Compress every (codec, dataset) once, write ``<case>.cc`` and ``<case>.npy``, report the chunk flags."""
    import cupycodec as cc

    gpu = args.device == "cuda"
    info = cc.info()
    _emit("info", info=info)
    workdir = Path(args.workdir)
    for codec in args.codecs.split(","):
        for data in args.data.split(","):
            case = f"{codec}-{data}"
            try:
                host, dtype = make_array(data)
                arr = host
                if gpu:
                    import cupy

                    arr = cupy.asarray(host)
                c = cc.compress(arr, codec=codec, chunk_nbytes=args.chunk_kib * 1024, dtype=dtype)
                if gpu and c.producer.get("backend") != "nvcomp":
                    raise RuntimeError(f"compressed by {c.producer.get('backend')!r}, not nvCOMP")
                blob = c.to_bytes()
                n_chunks = sum(s.n_chunks for s in c.segments)
                n_encoded = sum(int((s.table.flags == 0).sum()) for s in c.segments)
                (workdir / f"{case}.cc").write_bytes(blob)
                np.save(workdir / f"{case}.npy", host)
                _emit("prepared", case=case, codec=codec, data=data, nbytes=len(blob), n_chunks=n_chunks,
                      n_encoded=n_encoded)
            except Exception as exc:
                _emit("prepared", case=case, codec=codec, data=data, error=_message(exc))
    return 0


def _health_check() -> None:
    """Raise unless the CUDA context still runs work: a synchronize and a small kernel with a known result."""
    import cupy

    cupy.cuda.runtime.deviceSynchronize()
    value = int((cupy.arange(256, dtype=cupy.int32) * 2).sum())
    if value != 65280:
        raise RuntimeError(f"health-check kernel returned {value}, expected 65280")


def _decoder(cc, mode: str, device: str):
    if mode == "trusted":
        def decode(blob):
            return cc.decompress(cc.CompressedArray.from_bytes(blob, trusted=True), device=device)
    else:
        def decode(blob):
            return cc.decompress(cc.CompressedArray.from_bytes(blob), device=device)
    return decode


def _run_one(decode, blob: bytes, original: np.ndarray, cc, gpu: bool) -> tuple[str, str | None]:
    try:
        y = decode(blob)
        if gpu:
            import cupy

            cupy.cuda.runtime.deviceSynchronize()
            y = cupy.asnumpy(y)
        outcome, message = ("same" if same_array(np.asarray(y), original) else "silent_wrong"), None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # pyo3 panics derive from BaseException: they count too
        outcome, message = classify_exception(exc, cc), _message(exc)
    if gpu and outcome != "cuda_error":
        try:
            _health_check()
        except Exception as exc:
            return "cuda_error", f"context unusable after a trial classified {outcome!r}: {_message(exc)}"
    return outcome, message


def worker_main(args) -> int:
    """Run trials [start, stop) of one case, one tagged JSON line each; exit after a CUDA error."""
    import cupycodec as cc

    gpu = args.device == "cuda"
    workdir = Path(args.workdir)
    good = (workdir / f"{args.worker}.cc").read_bytes()
    original = np.ascontiguousarray(np.load(workdir / f"{args.worker}.npy"))
    if gpu:
        _health_check()
    decode = _decoder(cc, args.mode, args.device)
    warmup, warmup_message = _run_one(decode, good, original, cc, gpu)
    _emit("ready", pid=os.getpid(), warmup=warmup, warmup_error=warmup_message)
    if warmup == "cuda_error":
        _emit("exit", reason="CUDA context dead after decoding the unmodified container")
        return 0
    for trial in range(args.start, args.stop):
        try:
            blob, n_bytes = trial_blob(good, args.worker, args.seed, trial)
        except Exception:  # the harness itself is broken: not a trial outcome
            _emit("fatal", error=traceback.format_exc(limit=5))
            return 1
        t0 = time.perf_counter()
        outcome, message = _run_one(decode, blob, original, cc, gpu)
        extra = {"log_size": _log_size(Path(args.sanitizer_log))} if args.sanitizer_log else {}
        _emit("trial", trial=trial, outcome=outcome, n_bytes=n_bytes, seconds=round(time.perf_counter() - t0, 6),
              error=message, **extra)
        if outcome == "cuda_error":
            _emit("exit", reason="CUDA context dead")
            return 0
    _emit("done")
    return 0


# --------------------------------------------------------------------------------------------------------------
# compute-sanitizer logs
# --------------------------------------------------------------------------------------------------------------

_HEADLINE = re.compile(rb"^={5,} (\S[^\r\n]*)", re.M)
_SUMMARY = re.compile(rb"ERROR SUMMARY: (\d+) errors?")
_NOT_ERRORS = ("COMPUTE-SANITIZER", "ERROR SUMMARY", "LEAK SUMMARY", "RACECHECK SUMMARY",
               "Target application returned")
_NOTES = ("Error:", "Warning", "Note", "Internal Sanitizer Error")


def _error_kind(headline: str) -> str:
    if headline.startswith("Program hit"):
        return " ".join(headline.split()[:3])  # "Program hit cudaErrorLaunchFailure"
    kind = re.sub(r" of size \d+ bytes?", "", headline)
    kind = re.sub(r"0x[0-9a-fA-F]+", "0x?", kind)
    return kind[:100]


def parse_sanitizer_log(log: bytes | str) -> dict:
    """Error records of one compute-sanitizer log: ``errors`` [(byte offset, kind)], ``summary`` (the ERROR
    SUMMARY count, None when the process died before printing it), ``notes`` (the sanitizer's own failures and
    warnings), ``count`` (the summary if present, else the number of records)."""
    if isinstance(log, str):
        log = log.encode()
    errors, notes = [], []
    for m in _HEADLINE.finditer(log):
        text = m.group(1).decode("utf-8", "replace").strip()
        if text.startswith(_NOT_ERRORS):
            continue
        if text.startswith(_NOTES):
            notes.append(text)
            continue
        errors.append((m.start(), _error_kind(text)))
    summaries = _SUMMARY.findall(log)
    summary = int(summaries[-1]) if summaries else None
    return {"errors": errors, "summary": summary, "notes": notes,
            "count": summary if summary is not None else len(errors)}


def attribute_errors(errors: list, snapshots: list[tuple[int, int]], died_on: int | None) -> dict:
    """Trial -> number of error records, by the log's size when each trial reported (``snapshots``: (trial, size)
    in order). Records written after the last report go to the trial the worker died or hung on, else to
    ``"after_last_trial"``."""
    out: dict = collections.Counter()
    for offset, _kind in errors:
        for trial, size in snapshots:
            if offset < size:
                out[trial] += 1
                break
        else:
            out[died_on if died_on is not None else "after_last_trial"] += 1
    return dict(out)


# --------------------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------------------


class _Worker:
    """One worker process in its own session (so a kill reaches compute-sanitizer's target too), read by lines."""

    def __init__(self, argv: list[str], stderr_path: Path, env: dict | None):
        self.stderr_path = stderr_path
        with open(stderr_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                         env=env, start_new_session=True)
        self._buf = b""
        self._eof = False
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)

    def readline(self, timeout: float) -> bytes | None:
        """The next line, None after ``timeout`` seconds without one; EOFError once the output has ended."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            if self._eof:
                if self._buf:
                    line, self._buf = self._buf, b""
                    return line
                raise EOFError
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._sel.select(remaining):
                return None
            data = os.read(self.proc.stdout.fileno(), 1 << 16)
            if data:
                self._buf += data
            else:
                self._eof = True
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group this worker leads (start_new_session)
        with contextlib.suppress(subprocess.TimeoutExpired):  # stuck in the driver: leave it rather than hang
            self.proc.wait(timeout=120)

    def finish(self, grace: float = 30.0) -> int:
        """Wait for a worker whose output ended; kill it if it lingers. Returns its exit status."""
        try:
            return self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        else:  # it exited: end what it left running in its group (just reaped, so the group id is still its own)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._sel.close()
        self.proc.stdout.close()

    def stderr_tail(self, nbytes: int = 2000) -> str:
        try:
            with open(self.stderr_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.stderr_path) - nbytes))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(TAG)]
        return " | ".join(lines[-3:])


def _log_size(path: Path | None) -> int:
    try:
        return os.path.getsize(path) if path is not None else 0
    except OSError:
        return 0


def run_case(case: str, trials: int, worker_argv, *, workdir: Path, timeout: float, startup_timeout: float,
             deadline: float, sanitizer: bool = False, env: dict | None = None, log=print, tag: str = "") -> dict:
    """Run trials 0..trials-1 of one case through workers, restarting after every death or timeout.

    ``worker_argv(start, log_path)`` gives the command of a worker that runs trials [start, trials) and prints
    tagged JSON lines (``ready``, ``trial``, ``exit``, ``done``, ``fatal``). A worker that ends without reporting
    the trial it was on charges that trial as ``cuda_error``; one silent for ``timeout`` seconds is killed and the
    trial is a ``hang``. Stops at ``deadline`` (time.monotonic) and reports what it has.
    """
    records: dict[int, dict] = {}
    workers: list[dict] = []
    next_trial, idle_workers = 0, 0
    stopped, error, warmup = None, None, None

    def charge(outcome: str, message: str, winfo: dict, log_path) -> None:
        nonlocal next_trial
        records[next_trial] = {"trial": next_trial, "outcome": outcome, "n_bytes": None, "error": message}
        winfo["snapshots"].append((next_trial, _log_size(log_path)))
        winfo["died_on"] = next_trial
        next_trial += 1

    while next_trial < trials and not (error or stopped):
        if time.monotonic() >= deadline:
            stopped = "budget"
            break
        stem = f"{tag + '-' if tag else ''}{case}.w{len(workers)}"  # cases of both modes may run at once
        log_path = workdir / f"{stem}.sanitizer.log" if sanitizer else None
        w = _Worker(worker_argv(next_trial, None if log_path is None else str(log_path)),
                    workdir / f"{stem}.stderr", env)
        winfo = {"pid": w.proc.pid, "first_trial": next_trial, "stderr": str(w.stderr_path),
                 "log": None if log_path is None else str(log_path), "snapshots": [], "died_on": None}
        workers.append(winfo)
        ready, ended = False, None
        last = time.monotonic()
        try:
            while ended is None:
                limit = last + (timeout if ready else startup_timeout)
                try:
                    line = w.readline(max(0.0, min(limit, deadline) - time.monotonic()))
                except EOFError:
                    status = w.finish()
                    if not ready:
                        winfo["failed_start"] = f"exit status {status}: {w.stderr_tail()}"
                    elif next_trial < trials:
                        tail = w.stderr_tail()
                        charge("cuda_error", f"worker died (exit status {status}) without reporting"
                               + (f": {tail}" if tail else ""), winfo, log_path)
                    break
                if line is None:
                    w.kill()
                    if time.monotonic() >= deadline and deadline < limit:
                        stopped = "budget"  # the trial cut short is not charged
                    elif not ready:
                        winfo["failed_start"] = f"not ready within {startup_timeout:g} s: {w.stderr_tail()}"
                    elif next_trial < trials:
                        charge("hang", f"no report within {timeout:g} s; worker killed", winfo, log_path)
                    break
                if not line.startswith(TAG.encode()):
                    continue  # a library's own output
                try:
                    msg = json.loads(line[len(TAG):])
                except json.JSONDecodeError:
                    continue
                last = time.monotonic()
                event = msg.get("event")
                if event == "ready":
                    ready = True
                    if warmup is None:
                        warmup = {"outcome": msg.get("warmup"), "error": msg.get("warmup_error")}
                elif event == "trial" and msg.get("trial") == next_trial and next_trial < trials:
                    ready = True
                    records[next_trial] = {key: v for key, v in msg.items() if key not in ("event", "log_size")}
                    # the worker measures the log right after its trial; the driver may read several lines at once
                    winfo["snapshots"].append((next_trial, msg.get("log_size", _log_size(log_path))))
                    next_trial += 1
                elif event == "trial":
                    error = f"worker reported trial {msg.get('trial')} while trial {next_trial} was due"
                    break
                elif event in ("exit", "done"):
                    ended = event
                    w.finish()  # let it exit by itself: compute-sanitizer writes its summary at the end
                    if event == "done" and next_trial < trials:
                        error = f"worker ended at trial {next_trial} of {trials}"
                elif event == "fatal":
                    error = f"worker failed outside the decoder: {msg.get('error')}"
                    break
        finally:
            w.close()
            winfo["returncode"] = w.proc.returncode
        if error or stopped:
            break
        if next_trial == winfo["first_trial"]:  # failed to start, or exited before its first trial
            idle_workers += 1
            why = winfo.get("failed_start") or f"exited before trial {next_trial} (warm-up: {warmup})"
            log(f"  {case}: worker made no progress: {why}")
            if idle_workers >= _MAX_IDLE_WORKERS:
                error = f"{idle_workers} workers in a row made no progress: {why}"
        else:
            idle_workers = 0
    result = {"case": case, "trials_requested": trials, "trials_run": len(records),
              "counts": dict(collections.Counter(r["outcome"] for r in records.values())),
              "records": [records[t] for t in sorted(records)], "workers": workers,
              "restarts": max(0, len(workers) - 1), "stopped": stopped, "error": error, "warmup": warmup}
    if sanitizer:
        _add_sanitizer_counts(result)
    return result


def _add_sanitizer_counts(result: dict) -> None:
    total, kinds, notes = 0, collections.Counter(), []
    by_trial: dict = collections.Counter()
    for winfo in result["workers"]:
        try:
            with open(winfo["log"], "rb") as f:
                parsed = parse_sanitizer_log(f.read())
        except (OSError, TypeError):
            winfo["sanitizer"] = None
            continue
        winfo["sanitizer"] = {"count": parsed["count"], "summary": parsed["summary"]}
        total += parsed["count"]
        kinds.update(kind for _, kind in parsed["errors"])
        notes.extend(parsed["notes"])
        by_trial.update(attribute_errors(parsed["errors"], winfo["snapshots"], winfo.get("died_on")))
    for rec in result["records"]:
        rec["sanitizer_errors"] = by_trial.get(rec["trial"], 0)
    result["sanitizer"] = {"errors": total, "kinds": dict(kinds), "notes": sorted(set(notes))[:20],
                           "by_trial": {str(k): v for k, v in by_trial.items()},
                           "attribution": "best effort: by the log's size when each trial reported"}


# --------------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------------


def _cell(text: str | None, limit: int = 90) -> str:
    if not text:
        return ""
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def markdown_table(results: list[dict], mode: str) -> str:
    """codec x outcome counts, sanitizer errors and the first CUDA error message, one row per case."""
    head = ["codec", "data", "trials", *OUTCOMES, "restarts", "sanitizer errors", "first CUDA error / note"]
    lines = [f"### mode: {mode}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        counts = r.get("counts", {})
        first = next((rec.get("error") for rec in r.get("records", []) if rec["outcome"] in ("cuda_error", "hang")),
                     None)
        warm = r.get("warmup") or {}
        bad_warmup = (f"unmodified container: {warm.get('outcome')} {warm.get('error') or ''}"
                      if warm.get("outcome") not in (None, "same", "refused") else None)
        note = r.get("skipped") or r.get("error") or bad_warmup or first
        if r.get("stopped"):
            note = f"(stopped: {r['stopped']}) {note or ''}"
        san = r.get("sanitizer")
        row = [r["codec"], r["data"], f"{r.get('trials_run', 0)}/{r.get('trials_requested', 0)}",
               *[str(counts.get(o, 0)) for o in OUTCOMES], str(r.get("restarts", 0)),
               "-" if san is None else str(san["errors"]), _cell(note)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def default_mode_violations(results: list[dict]) -> list[str]:
    """What default (untrusted) mode must never show: CUDA errors, hangs, foreign errors, sanitizer reports."""
    out = []
    for r in results:
        bad = {o: r.get("counts", {}).get(o, 0) for o in BAD_IN_DEFAULT_MODE}
        bad = {o: n for o, n in bad.items() if n}
        if r.get("sanitizer") and r["sanitizer"]["errors"]:
            bad["sanitizer errors"] = r["sanitizer"]["errors"]
        if bad:
            out.append(f"{r['case']}: {bad}")
    return out


# --------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------


def _subprocess_env() -> dict:
    """The environment for workers: this cupycodec first on PYTHONPATH, unbuffered output."""
    import cupycodec

    env = dict(os.environ)
    pkg_parent = str(Path(cupycodec.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([pkg_parent, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _prepare(args, workdir: Path, env: dict) -> tuple[list[dict], dict]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--prepare", "--codecs", args.codecs, "--data", args.data,
            "--chunk-kib", str(args.chunk_kib), "--device", args.device, "--workdir", str(workdir)]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=args.startup_timeout * 5)
    cases, info = [], {}
    for line in proc.stdout.splitlines():
        if line.startswith(TAG):
            msg = json.loads(line[len(TAG):])
            if msg["event"] == "info":
                info = msg["info"]
            elif msg["event"] == "prepared":
                cases.append(msg)
    if proc.returncode != 0 or not cases:
        raise SystemExit(f"prepare step failed (exit status {proc.returncode}):\n{proc.stderr[-3000:]}")
    for c in cases:
        if "error" in c:
            c["skipped"] = f"prepare failed: {c['error']}"
        elif c["codec"] != "raw" and 2 * c["n_encoded"] < c["n_chunks"]:
            c["skipped"] = (f"only {c['n_encoded']}/{c['n_chunks']} chunks encoded: crafted bytes would not reach "
                            "the decoder")
    return cases, info


def _worker_argv_factory(args, workdir: Path, case: str, mode: str, sanitizer_exe: str | None):
    script = str(Path(__file__).resolve())

    def argv(start: int, log_path: str | None) -> list[str]:
        cmd = [sys.executable, script, "--worker", case, "--start", str(start), "--stop", str(args.trials),
               "--mode", mode, "--seed", str(args.seed), "--device", args.device, "--workdir", str(workdir)]
        if sanitizer_exe:
            cmd = [sanitizer_exe, "--tool", "memcheck", "--print-limit", "0", "--error-exitcode", "0",
                   "--log-file", log_path, *cmd, "--sanitizer-log", log_path]
        return cmd

    return argv


def _save_blobs(args, workdir: Path, mode: str, result: dict) -> list[str]:
    good = (workdir / f"{result['case']}.cc").read_bytes()
    out_dir = workdir / "blobs"
    saved = []
    for rec in result["records"]:
        if rec["outcome"] in BAD_IN_DEFAULT_MODE or rec.get("sanitizer_errors"):
            out_dir.mkdir(exist_ok=True)
            blob, _ = trial_blob(good, result["case"], args.seed, rec["trial"])
            path = out_dir / f"{mode}-{result['case']}-t{rec['trial']}.cc"
            path.write_bytes(blob)
            saved.append(str(path))
    return saved


def _parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="See the module docstring for outcomes, modes and expected durations.")
    p.add_argument("--codecs", default=",".join(CODECS), help="comma-separated codec ids (default: all GPU codecs)")
    p.add_argument("--data", default=",".join(DATASETS), help="comma-separated datasets: bf16, i32")
    p.add_argument("--trials", type=int, default=300, help="crafted blobs per case and mode")
    p.add_argument("--mode", choices=["trusted", "default", "both"], default="both")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds a trial may take before the worker is killed (default 30, 300 with --sanitizer)")
    p.add_argument("--startup-timeout", type=float, default=None,
                   help="seconds a worker may take to start (default 120, 600 with --sanitizer)")
    p.add_argument("--sanitizer", action="store_true", help="run workers under compute-sanitizer --tool memcheck")
    p.add_argument("--budget-s", type=float, default=1200.0, help="stop after this many seconds and report")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1,
                   help="cases run at once, each in its own worker processes (a CUDA error kills only its worker's "
                        "context)")
    p.add_argument("--chunk-kib", type=int, default=64, help="chunk size in KiB (512 KiB arrays: 8 chunks)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: decode on the host (checks the harness without a GPU)")
    p.add_argument("--workdir", help="where blobs, worker stderr and sanitizer logs go (default: a new temp dir)")
    p.add_argument("--save-blobs", action="store_true",
                   help="write the crafted blobs of trials that died, hung or drew sanitizer errors to WORKDIR/blobs")
    p.add_argument("--json", help="write every trial's record and the summary here")
    p.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", metavar="CASE", help=argparse.SUPPRESS)
    p.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--stop", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--sanitizer-log", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.timeout is None:
        args.timeout = 300.0 if args.sanitizer else 30.0
    if args.startup_timeout is None:
        args.startup_timeout = 600.0 if args.sanitizer else 120.0
    if args.sanitizer and args.device != "cuda":
        p.error("--sanitizer needs --device cuda")
    for codec in args.codecs.split(","):
        if codec not in CODECS:
            p.error(f"unknown codec {codec!r}; choose from {','.join(CODECS)}")
    for data in args.data.split(","):
        if data not in DATASETS:
            p.error(f"unknown dataset {data!r}; choose from {','.join(DATASETS)}")
    return args


def main(argv=None) -> int:
    args = _parse_args(argv)
    if args.prepare:
        return prepare_main(args)
    if args.worker:
        return worker_main(args)

    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    sanitizer_exe = None
    if args.sanitizer:
        sanitizer_exe = shutil.which("compute-sanitizer")
        if sanitizer_exe is None:
            print("compute-sanitizer is not on the PATH", file=sys.stderr)
            return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="cupycodec-fuzz-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = _subprocess_env()
    print(f"work directory: {workdir}", flush=True)
    cases, info = _prepare(args, workdir, env)
    modes = ["default", "trusted"] if args.mode == "both" else [args.mode]
    tasks = [(mode, c) for mode in modes for c in cases]
    remaining = [sum("skipped" not in c for _, c in tasks)]
    lock = threading.Lock()
    interrupted = threading.Event()

    def do(task) -> dict:
        mode, c = task
        if "skipped" in c:
            return {**c, "trials_requested": args.trials, "trials_run": 0}
        with lock:  # each running case gets an equal share of what is left; --jobs of them run at once
            now = time.monotonic()
            share = min(deadline, now + max(0.0, deadline - now) * args.jobs / max(1, remaining[0]))
            remaining[0] -= 1
        print(f"[{mode}] {c['case']}: {c['n_encoded']}/{c['n_chunks']} chunks encoded, "
              f"{max(0.0, share - now):.0f} s of budget", flush=True)
        if interrupted.is_set():
            r = {"case": c["case"], "trials_requested": args.trials, "trials_run": 0, "stopped": "interrupted"}
        else:
            try:
                r = run_case(c["case"], args.trials, _worker_argv_factory(args, workdir, c["case"], mode,
                                                                          sanitizer_exe),
                             workdir=workdir, timeout=args.timeout, startup_timeout=args.startup_timeout,
                             deadline=share, sanitizer=args.sanitizer, env=env, tag=mode)
            except KeyboardInterrupt:
                interrupted.set()
                r = {"case": c["case"], "trials_requested": args.trials, "trials_run": 0, "stopped": "interrupted"}
        r.update(codec=c["codec"], data=c["data"], n_chunks=c["n_chunks"], n_encoded=c["n_encoded"])
        for rec in r.get("records", []):
            if rec.get("n_bytes") is None:  # a trial the driver charged (death, hang)
                rec["n_bytes"] = trial_rng(c["case"], args.seed, rec["trial"])[1]
        if args.save_blobs and r.get("records"):
            r["saved_blobs"] = _save_blobs(args, workdir, mode, r)
        print(f"    [{mode}] {c['case']}: {r.get('counts', {})} restarts={r.get('restarts', 0)}"
              + (f" error={r['error']}" if r.get("error") else ""), flush=True)
        warm = r.get("warmup") or {}
        if warm.get("outcome") not in (None, "same", "refused"):
            print(f"    WARNING: the unmodified container gave {warm['outcome']}: {warm.get('error')}", flush=True)
        return r

    if args.jobs == 1:
        done = [do(t) for t in tasks]
    else:
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            done = list(pool.map(do, tasks))
    results: dict[str, list[dict]] = {m: [] for m in modes}
    for (mode, _), r in zip(tasks, done):
        results[mode].append(r)

    tables = [markdown_table(results[m], m) for m in modes]
    print()
    print("\n\n".join(tables))
    violations = default_mode_violations(results.get("default", []))
    if "default" in results:
        print()
        print("default mode: " + ("OK (only refused/reported/same/silent_wrong)" if not violations
                                  else "VIOLATIONS: " + "; ".join(violations)))
    elapsed = time.monotonic() - t_start
    print(f"\n{elapsed:.0f} s; work directory {workdir}")
    if args.json:
        doc = {"config": {k: v for k, v in vars(args).items() if k not in ("prepare", "worker", "start", "stop")},
               "info": info, "seconds": round(elapsed, 1), "results": results, "tables": tables,
               "default_mode_violations": violations}
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
