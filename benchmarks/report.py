#!/usr/bin/env python3
"""Turns Google Benchmark JSON files into the benchmark tables of docs/benchmarks.md: mmkd against libtorch,
measured in the same run, on 1 and on 2 threads.

Benchmark names are <impl>_<Class>_<call>/<args...>; impl is "mmkd", "mmkd-blas" (Eigen's
products handed to OpenBLAS), "torch", or "gemm"/"gemm-blas" (a plain GEMM). Each file's thread
count is its context entry "threads" (scripts/bench.sh passes --benchmark_context=threads=N).
The median of the repetitions is used when there are any.
"""
import json
import re
import sys
from collections import OrderedDict


def load(paths):
    """rows[(call, args)][(impl, threads)] = {"us": median real time, "c": the counters}."""
    rows = OrderedDict()
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        threads = int(data.get("context", {}).get("threads", 1))
        for b in data["benchmarks"]:
            if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
                continue
            name = b.get("run_name", b["name"]).replace("/real_time", "")
            name = re.sub(r"/min_time:[^/]*", "", name)
            impl, _, rest = name.partition("_")
            call, _, args = rest.partition("/")
            scale = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}[b["time_unit"]]
            rows.setdefault((call, args), {})[(impl, threads)] = {
                "us": b["real_time"] * scale, "c": b}
    return rows


def fmt_time(us):
    return f"{us / 1e3:.2f} ms" if us >= 1e4 else f"{us:.1f} µs"


def fmt_shape(args):
    parts = args.split("/")
    if all(":" in p for p in parts):
        return ", ".join(p.replace(":", " = ") for p in parts)
    return " x ".join(parts)


def rate(entry):
    c = entry["c"]
    if "FLOPS" in c:
        return f"{c['FLOPS'] / 1e9:.1f} GFLOP/s"
    if "bytes_per_second" in c:
        return f"{c['bytes_per_second'] / 1e9:.1f} GB/s"
    return ""


def share(entry):
    c = entry["c"]
    parts = []
    if "GEMM_share" in c:
        parts.append(f"{100 * c['GEMM_share']:.0f}% of GEMM")
    if "BW_share" in c:
        parts.append(f"{100 * c['BW_share']:.0f}% of bandwidth")
    if "exp_share" in c:
        parts.append(f"{100 * c['exp_share']:.0f}% of exp")
    if "products_share" in c:
        parts.append(f"{100 * c['products_share']:.0f}% of its products")
    if "peak_extra" in c:
        parts.append(f"peak extra memory {c['peak_extra']:.2f}·chunk·V")
    return ", ".join(parts)


def ratio(num, den):
    return f"{num['us'] / den['us']:.1f}x" if num and den else "—"


def table(rows, mine, gemm, t1, t2, title):
    print(f"| {title} | shape | {mine} | libtorch | speed-up | {mine} rate | share of limit | "
          f"{mine}, {t2} threads | libtorch, {t2} threads | speed-up | {mine} scaling | "
          f"libtorch scaling |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (call, args), impls in rows.items():
        if call == "GEMM":
            label, m1, m2, r1, r2 = "plain GEMM (m x n x k)", impls.get((gemm, t1)), impls.get(
                (gemm, t2)), None, None
        else:
            label = call.replace("_", " ")
            m1, m2 = impls.get((mine, t1)), impls.get((mine, t2))
            r1, r2 = impls.get(("torch", t1)), impls.get(("torch", t2))
        if not m1:
            continue
        print(f"| {label} | {fmt_shape(args)} | {fmt_time(m1['us'])} | "
              f"{fmt_time(r1['us']) if r1 else '—'} | **{ratio(r1, m1)}** | {rate(m1)} | "
              f"{share(m1)} | {fmt_time(m2['us']) if m2 else '—'} | "
              f"{fmt_time(r2['us']) if r2 else '—'} | **{ratio(r2, m2)}** | {ratio(m1, m2)} | "
              f"{ratio(r1, r2)} |".replace("**—**", "—"))


def load_table(rows, t1, t2):
    """mmkd's calls under competing load (scripts/bench.sh --busy): the t2-thread time over the
    t1-thread time, measured while every core also runs a busy process."""
    print(f"| class / call | shape | {t1} thread | {t2} threads | {t2} threads / {t1} thread |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for (call, args), impls in rows.items():
        for mine in ("mmkd", "mmkd-blas"):
            m1, m2 = impls.get((mine, t1)), impls.get((mine, t2))
            if not (m1 and m2):
                continue
            r = m2["us"] / m1["us"]
            worst = max(worst, r)
            label = call.replace("_", " ") + (" (OpenBLAS)" if mine == "mmkd-blas" else "")
            print(f"| {label} | {fmt_shape(args)} | {fmt_time(m1['us'])} | {fmt_time(m2['us'])} | "
                  f"{r:.2f} |")
    print(f"\nworst {t2}-thread / {t1}-thread ratio under load: {worst:.2f}")


def main():
    if sys.argv[1] == "--load":
        rows = load(sys.argv[2:])
        threads = sorted({t for impls in rows.values() for (_, t) in impls})
        load_table(rows, threads[0], threads[-1])
        return
    rows = load(sys.argv[1:])
    threads = sorted({t for impls in rows.values() for (_, t) in impls})
    t1, t2 = threads[0], threads[-1]
    table(rows, "mmkd", "gemm", t1, t2, "class / call")
    if any(impl == "mmkd-blas" for impls in rows.values() for (impl, _) in impls):
        print()
        blas_rows = OrderedDict((k, v) for k, v in rows.items()
                                if any(i in ("mmkd-blas", "gemm-blas") for (i, _) in v))
        table(blas_rows, "mmkd-blas", "gemm-blas", t1, t2, "with OpenBLAS: class / call")


if __name__ == "__main__":
    main()
