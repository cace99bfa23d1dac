"""Print the kernel rates of saved pytest-benchmark runs: op, shape, backend, GFLOP/s, fraction of GEMM.

    pytest bench/test_bench_kernels.py --benchmark-only --benchmark-autosave
    python bench/report.py                      # the newest run under .benchmarks/
    python bench/report.py run1.json run2.json  # side by side, one column pair per run

The fractions are against the float32 GEMM rate measured in the same run (``frac_of_gemm``
in each benchmark's ``extra_info``): compare fractions across runs, not raw times, on a
shared machine.  ``pytest-benchmark compare`` shows the raw timings.
"""
import argparse
import json
import pathlib
import sys


def newest_run(root=".benchmarks"):
    runs = sorted(pathlib.Path(root).glob("*/*.json"), key=lambda p: p.stat().st_mtime)
    if not runs:
        sys.exit(f"no saved runs under {root}/ (run pytest with --benchmark-autosave or --benchmark-json=FILE)")
    return runs[-1]


def rows(path):
    """{(group, test name): (backend, gflops or GB/s, unit, frac_of_gemm or None)} of one run."""
    data = json.loads(pathlib.Path(path).read_text())
    out = {}
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if "gflops" in info:
            value, unit = info["gflops"], "GFLOP/s"
        elif "gbytes_per_s" in info:
            value, unit = info["gbytes_per_s"], "GB/s"
        else:
            continue
        out[(b.get("group") or "", b["name"])] = (info.get("backend", ""), value, unit, info.get("frac_of_gemm"))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", help="pytest-benchmark JSON files (default: the newest saved run)")
    args = ap.parse_args(argv)
    paths = args.runs or [newest_run()]
    tables = [rows(p) for p in paths]
    keys = sorted(set().union(*tables))
    head = f"{'group':<15} {'benchmark':<52} {'backend':<9}"
    print(head + "".join(f" | {pathlib.Path(p).stem[-24:]:>24}" for p in paths))
    print(f"{'':<78}" + " | {:>24}".format("rate  unit   of GEMM") * len(paths))
    for key in keys:
        backend = next((t[key][0] for t in tables if key in t), "")
        line = f"{key[0]:<15} {key[1][:52]:<52} {backend:<9}"
        for t in tables:
            if key not in t:
                line += f" | {'-':>24}"
                continue
            _, value, unit, frac = t[key]
            f = "-" if frac is None else f"{frac:.2f}"
            line += f" | {value:8.1f} {unit:<7} {f:>7}"
        print(line)


if __name__ == "__main__":
    main()
