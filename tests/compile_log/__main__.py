"""Summary of a compile log (see sitecustomize.py): `python -m tests.compile_log LOG [--top N]`.

Prints the compiles' seconds per test file and per function (a kernel built per format set
shows as several compiles of one name)."""

import argparse
import collections
import json


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.compile_log")
    ap.add_argument("log")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args(argv)
    records = [json.loads(line) for line in open(a.log)]
    print(f"{len(records)} compiles, {sum(r['seconds'] for r in records):.1f} s in {len({r['pid'] for r in records})} processes")
    by_file, by_function, count = collections.Counter(), collections.Counter(), collections.Counter()
    for r in records:
        by_file[r["test"].split("::")[0] or "(outside a test)"] += r["seconds"]
        by_function[r["function"]] += r["seconds"]
        count[r["function"]] += 1
    print("\nseconds  test file")
    for name, s in by_file.most_common(a.top):
        print(f"{s:7.1f}  {name}")
    print("\nseconds  compiles  function")
    for name, s in by_function.most_common(a.top):
        print(f"{s:7.1f}  {count[name]:8d}  {name}")


if __name__ == "__main__":
    main()
