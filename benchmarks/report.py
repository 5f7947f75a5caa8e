#!/usr/bin/env python3
"""Turns Google Benchmark JSON files into the README's table: mmkd vs libtorch, same run.

Benchmark names are <impl>_<Loss>_<what>/<args...>; impl is "mmkd", "mmkd-blas" or "torch".
The median of the repetitions is used when there are any.
"""
import json
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
            name = b.get("run_name", b["name"])
            name = name.replace("/real_time", "")
            impl, _, rest = name.partition("_")
            loss_what, _, args = rest.partition("/")
            scale = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}[b["time_unit"]]
            entry = rows.setdefault((loss_what, args), {})
            entry[impl] = {"us": b["real_time"] * scale, "counters": b}
    return rows


def fmt_time(us):
    return f"{us / 1e3:.2f} ms" if us >= 1e4 else f"{us:.1f} µs"


def main():
    rows = load(sys.argv[1:])
    print("| loss / call | shape | mmkd | libtorch | speed-up | mmkd throughput |")
    print("|---|---|---|---|---|---|")
    for (loss_what, args), impls in rows.items():
        if "mmkd" not in impls:
            continue
        m = impls["mmkd"]
        t = impls.get("torch")
        shape = " x ".join(args.split("/"))
        ratio = f"**{t['us'] / m['us']:.1f}x**" if t else "—"
        extra = []
        c = m["counters"]
        if "bytes_per_second" in c:
            extra.append(f"{c['bytes_per_second'] / 1e9:.1f} GB/s")
        if "FLOPS" in c:
            extra.append(f"{c['FLOPS'] / 1e9:.1f} GFLOP/s")
        print(f"| {loss_what.replace('_', ' ')} | {shape} | {fmt_time(m['us'])} | "
              f"{fmt_time(t['us']) if t else '—'} | {ratio} | {', '.join(extra)} |")


if __name__ == "__main__":
    main()
