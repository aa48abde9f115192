"""What a decoded layer's check of its ``packed`` buffer costs a forward (host time), same process, A/B.

Every lossless / int8+entropy forward (and every block decode) asks whether the layer's ``packed`` tensor is still
the one its header describes (``CompressedLinear._packed_changed``: a weak reference and the tensor's version).
This times batch-1 forwards of one layer, enqueued back to back, with the check as shipped and with it off
(``_stamp = None``), in alternating rounds; host microseconds per call, medians.

Usage: python benchmarks/stamp_cost.py [--device cuda] [--calls 3000] [--rounds 9] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from cupycodec.integrations.torch import CompressedLinear


def _round(layer, x, calls: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        layer(x)
    t1 = time.perf_counter()  # host time to enqueue; the GPU may still run
    sync()
    return (t1 - t0) / calls * 1e6


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--shape", default="5632x2048")
    p.add_argument("--json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    n, k = (int(v) for v in args.shape.split("x"))
    torch.manual_seed(0)
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "shape": [n, k],
           "calls": args.calls, "rows": {}}
    x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
    for mode in ("lossless", "int8+entropy"):
        lin = torch.nn.Linear(k, n, device=device, dtype=torch.bfloat16)
        layer = CompressedLinear.from_linear(lin, mode)
        with torch.no_grad():
            layer(x)
            stamp = layer._stamp
            on, off = [], []
            for r in range(args.rounds):
                for which in ((on, off) if r % 2 == 0 else (off, on)):
                    layer.__dict__["_stamp"] = stamp if which is on else None
                    which.append(_round(layer, x, args.calls, device))
            layer.__dict__["_stamp"] = stamp
        row = {"check_on_us": statistics.median(on), "check_off_us": statistics.median(off),
               "on_rounds": on, "off_rounds": off}
        out["rows"][mode] = row
        print(f"{mode:13s} host us/call: check on {row['check_on_us']:.2f}, off {row['check_off_us']:.2f} "
              f"(rounds on {min(on):.2f}-{max(on):.2f}, off {min(off):.2f}-{max(off):.2f})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
