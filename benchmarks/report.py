#!/usr/bin/env python3
"""Turns Google Benchmark JSON files into the README's table: mmkd vs libtorch, same run.

Benchmark names are <impl>_<Loss>_<what>/<args...>; impl is "mmkd", "mmkd-blas" (Eigen's
products handed to OpenBLAS), "torch", or "gemm"/"gemm-blas" (a plain GEMM). The median of the
repetitions is used when there are any.
"""
import json
import re
import sys
from collections import OrderedDict


def load(paths):
    rows = OrderedDict()
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for b in data["benchmarks"]:
            if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
                continue
            name = b.get("run_name", b["name"]).replace("/real_time", "")
            name = re.sub(r"/min_time:[^/]*", "", name)
            impl, _, rest = name.partition("_")
            loss_what, _, args = rest.partition("/")
            scale = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}[b["time_unit"]]
            rows.setdefault((loss_what, args), {})[impl] = {"us": b["real_time"] * scale, "c": b}
    return rows


def fmt_time(us):
    return f"{us / 1e3:.2f} ms" if us >= 1e4 else f"{us:.1f} µs"


def rate(entry):
    c = entry["c"]
    parts = []
    if "bytes_per_second" in c:
        parts.append(f"{c['bytes_per_second'] / 1e9:.1f} GB/s")
    if "FLOPS" in c:
        parts.append(f"{c['FLOPS'] / 1e9:.1f} GFLOP/s")
    if "GEMM_share" in c:
        parts.append(f"{100 * c['GEMM_share']:.0f}% of GEMM")
    return ", ".join(parts)


def main():
    rows = load(sys.argv[1:])
    blas = any("mmkd-blas" in impls or "gemm-blas" in impls for impls in rows.values())
    head = "| loss / call | shape | mmkd | libtorch | speed-up | mmkd rate |"
    sep = "|---|---|---|---|---|---|"
    if blas:
        head += " mmkd + OpenBLAS | speed-up | rate |"
        sep += "---|---|---|"
    print(head)
    print(sep)
    for (loss_what, args), impls in rows.items():
        shape = " x ".join(args.split("/"))
        if loss_what.startswith("ReviewKD"):
            shape = f"N = {shape}"
        if loss_what == "GEMM":
            g, gb = impls.get("gemm"), impls.get("gemm-blas")
            line = f"| plain GEMM (m x n x k) | {shape} | {fmt_time(g['us']) if g else '—'} | — | — | {rate(g) if g else ''} |"
            if blas:
                line += f" {fmt_time(gb['us']) if gb else '—'} | — | {rate(gb) if gb else ''} |"
            print(line)
            continue
        m, t, mb = impls.get("mmkd"), impls.get("torch"), impls.get("mmkd-blas")
        if not m:
            continue
        ratio = f"**{t['us'] / m['us']:.1f}x**" if t else "—"
        line = f"| {loss_what.replace('_', ' ')} | {shape} | {fmt_time(m['us'])} | {fmt_time(t['us']) if t else '—'} | {ratio} | {rate(m)} |"
        if blas:
            if mb:
                rb = f"**{t['us'] / mb['us']:.1f}x**" if t else "—"
                line += f" {fmt_time(mb['us'])} | {rb} | {rate(mb)} |"
            else:
                line += " | | |"
        print(line)


if __name__ == "__main__":
    main()
