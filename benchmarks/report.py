"""Render a bench_gpu.py JSON file as the Markdown tables of benchmarks/RESULTS.md.

Usage: python benchmarks/report.py benchmarks/results/<file>.json
"""

from __future__ import annotations

import json
import sys


def _f(v, nd=1):
    return "" if v is None else f"{v:.{nd}f}"


def render_ratios(r: dict) -> str:
    out = ["| data | mode | codec | ratio vs bf16 | SQNR dB |", "| --- | --- | --- | ---: | ---: |"]
    for x in r["rows"]:
        sq = "" if x["sqnr_db"] is None else f"{x['sqnr_db']:.1f}"
        out.append(f"| {x['data']} | {x['mode']} | {x['codec']} | {x['ratio_vs_bf16']:.3f} | {sq} |")
    return "\n".join(out)


def render_quant(r: dict) -> str:
    env = r["env"]
    out = [f"Card: **{env['gpu']}**, CuPy {env['cupy']}, {env['mib']} MiB per dtype, rows of {env['cols']}, "
           f"median of {env['reps']} batches of {env.get('batch', 1)} calls.", "",
           "| dtype | op | granularity | GB/s | of copy | GB/s (check=False) | of copy (check=False) | SQNR dB |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for x in r["rows"]:
        pct = lambda v: "" if v is None else f"{100 * v:.0f}%"  # noqa: E731
        out.append(f"| {x['dtype']} | {x['op']} | {x['granularity']} | {x['gb_s']:.0f} | {pct(x['of_copy'])} | "
                   f"{_f(x['gb_s_nocheck'], 0)} | {pct(x['of_copy_nocheck'])} | {_f(x['sqnr_db'])} |")
    return "\n".join(out)


def render(r: dict) -> str:
    if "rows" in r and r["rows"] and "ratio_vs_bf16" in r["rows"][0]:
        return render_ratios(r)
    if "rows" in r:
        return render_quant(r)
    env = r["env"]
    out = [f"Card: **{env['gpu']}**, driver/CUDA {env['driver']}/{env['cuda_runtime']}, CuPy {env['cupy']}, "
           f"nvCOMP {env['nvcomp']}, cupycodec {env['cupycodec']}, {env['date']}. "
           f"Device copy: {env.get('copy_gbps_read_plus_write', 0):.0f} GB/s (read + write).", ""]
    out += ["| data | codec | cupycodec chunk | ratio | compress GB/s | decode GB/s (plan) | decode GB/s (decompress) "
            "| nvCOMP direct ratio | nvCOMP direct decode GB/s | cupycodec / direct |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    direct = {(x["data"], x["codec"]): x for x in r["codecs"] if x.get("direct_nvcomp")}
    for x in r["codecs"]:
        if x.get("direct_nvcomp") or "error" in x:
            continue
        d = direct.get((x["data"], x["codec"]), {})
        rel = x["decode_gbps"] / d["decode_gbps"] if d.get("decode_gbps") else None
        out.append(f"| {x['data']} | {x['codec']} | {x['chunk'] // 1024} KiB | {x['ratio']:.3f} | "
                   f"{_f(x['compress_gbps'])} | {_f(x['decode_gbps'])} | {_f(x['decompress_oneshot_gbps'])} | "
                   f"{_f(d.get('ratio'), 3)} | {_f(d.get('decode_gbps'))} | {_f(rel, 2)} |")
    if r.get("sweep"):
        out += ["", "Chunk-size sweep (128 MiB): ratio / decode GB/s (plan)", ""]
        sizes = sorted({x["chunk"] for x in r["sweep"] if "chunk" in x})
        out.append("| data | codec | " + " | ".join(f"{s // 1024} KiB" for s in sizes) + " |")
        out.append("| --- | --- | " + " | ".join("---:" for _ in sizes) + " |")
        keys = []
        for x in r["sweep"]:
            if (x["data"], x["codec"]) not in keys:
                keys.append((x["data"], x["codec"]))
        for k in keys:
            cells = []
            for s in sizes:
                x = next((y for y in r["sweep"] if (y["data"], y["codec"]) == k and y.get("chunk") == s), None)
                cells.append("" if x is None or "error" in x else f"{x['ratio']:.3f} / {x['decode_gbps']:.0f}")
            out.append(f"| {k[0]} | {k[1]} | " + " | ".join(cells) + " |")
    if r.get("latency"):
        out += ["", "1 MiB (fp16) on the GPU, wall-clock medians:", "",
                "| codec | chunk | ratio | compress us | decompress us | round trip us |",
                "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for x in r["latency"]:
            if "latency_1mib" in x:
                out.append(f"| {x['latency_1mib']} | {x['chunk'] // 1024} KiB | {x['ratio']:.3f} | "
                           f"{x['compress_us']:.0f} | {x['decompress_us']:.0f} | {x['roundtrip_us']:.0f} |")
    if r.get("block"):
        out += ["", "A TinyLlama block (7 INT8 matrices, 44.0 MB) decoded in one call:", "",
                "| codec | chunk | skip_validate | ratio | GPU time us | data time us | overhead us | host enqueue us "
                "| decompress_many wall us |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for x in r["block"]:
            out.append(f"| {x['block_codec']} | {x.get('chunk', 0) // 1024} KiB | {x.get('skip_validate', 0)} | "
                       f"{x['ratio']:.3f} | {x['plan_run_gpu_us']:.1f} | {_f(x['data_time_us'])} | "
                       f"{_f(x['overhead_us'])} | {x['plan_enqueue_host_us']:.1f} | "
                       f"{x['decompress_many_wall_us']:.0f} |")
    if r.get("split"):
        for x in r["split"]:
            out += ["", f"Byte-plane kernels on 256 MiB of bf16: split {x['split_gbps']:.0f} GB/s "
                    f"({100 * x['split_of_copy']:.0f}% of copy), merge {x['merge_gbps']:.0f} GB/s "
                    f"({100 * x['merge_of_copy']:.0f}%), bytes read + written; exact: {x['exact']}."]
    if r.get("crc") and "cupycodec_us" in r["crc"][0]:
        out += ["", "Chunk CRC32s, GPU time (host launch cost excluded): cupycodec's kernel beside nvCOMP's "
                "`nvcompBatchedCRC32Async` on the same chunks:", "",
                "| total | chunk | cupycodec us | cupycodec GB/s | nvCOMP us | nvCOMP GB/s | equal |",
                "| ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for x in r["crc"]:
            out.append(f"| {x['crc_total'] >> 10} KiB | {x['crc_chunk'] >> 10} KiB | {x['cupycodec_us']:.1f} | "
                       f"{x['cupycodec_gbps']:.0f} | {x['nvcomp_us']:.1f} | {x['nvcomp_gbps']:.0f} | {x['equal']} |")
    elif r.get("crc"):
        out += ["", "nvCOMP CRC32 (GPU time):", "", "| total | chunk | us | GB/s |", "| ---: | ---: | ---: | ---: |"]
        for x in r["crc"]:
            out.append(f"| {x['crc_total'] >> 10} KiB | {x['crc_chunk'] >> 10} KiB | {x['us']:.0f} | {x['gbps']:.0f} |")
    for x in r.get("nosync", []):
        out += ["", f"No-sync check: `plan.run()` returned after {x['run_returned_ms']:.3f} ms while a 50 ms kernel "
                f"was running (done after {x['until_done_ms']:.1f} ms): run did not wait = {x['run_did_not_wait']}."]
    if r.get("cpu"):
        out += ["", "CPU decode on the GPU host (chunks spread over all threads):", "",
                "| codec | threads | ratio | GB/s |", "| --- | ---: | ---: | ---: |"]
        for x in r["cpu"]:
            out.append(f"| {x['cpu_decode']} | {x['threads']} | {x['ratio']:.3f} | {x['gbps']:.2f} |")
    return "\n".join(out)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(render(json.load(f)))
