"""Small-array latency of two cupycodec versions on the same GPU, in the same run, interleaved.

Runs ``bench_gpu.py --sections latency`` in a subprocess per version (both are importable as ``cupycodec``, so
each gets its own interpreter), alternating versions for ``--rounds`` rounds so that drift of the host affects
both alike, and writes every round plus the per-version medians to one JSON file.

Usage: python benchmarks/latency_ab.py --old PATH_WITH_OLD_cupycodec [--new .] [--rounds 3] --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def run(path: str) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(path), *filter(None, [env.get("PYTHONPATH")])])
    subprocess.run([sys.executable, os.path.join(HERE, "bench_gpu.py"), "--sections", "latency", "--mib", "8",
                    "--json", out], check=True, env=env, stdout=subprocess.DEVNULL)
    with open(out) as f:
        data = json.load(f)
    os.unlink(out)
    return data["latency"], data["env"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--old", required=True)
    p.add_argument("--new", default=os.path.dirname(HERE))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    rounds = []
    for r in range(args.rounds):
        for label, path in (("old", args.old), ("new", args.new)):
            rows, env = run(path)
            rounds.append({"round": r, "version": label, "env": env, "rows": rows})
            print(label, r, [(x["latency_1mib"], x["chunk"], round(x["roundtrip_us"])) for x in rows], flush=True)
    summary = {}
    for label in ("old", "new"):
        by: dict = {}
        for rd in rounds:
            if rd["version"] != label:
                continue
            for i, x in enumerate(rd["rows"]):  # same configs in the same order for both versions
                d = by.setdefault(f"{i}:{x['latency_1mib']}", {"chunk": x["chunk"]})
                for m in ("compress_us", "decompress_us", "decompress_fresh_us", "roundtrip_us"):
                    if m in x:
                        d.setdefault(m, []).append(x[m])
        summary[label] = {k: {m: (statistics.median(v) if isinstance(v, list) else v) for m, v in d.items()}
                          for k, d in by.items()}
    with open(args.json, "w") as f:
        json.dump({"rounds": rounds, "median_of_rounds": summary}, f, indent=1)
    for label in ("old", "new"):
        print(f"--- {label}: median of {args.rounds} rounds ---")
        for k, d in summary[label].items():
            print(f"{k:12s} chunk {d['chunk'] // 1024:5d} KiB  compress {d['compress_us']:7.0f} us  "
                  f"decompress(out=) {d['decompress_us']:6.0f} us  decompress {d.get('decompress_fresh_us', 0):6.0f} "
                  f"us  round trip {d['roundtrip_us']:7.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
