"""The weight slices a compiled GPU program copies, read from the HLO that `indexcache-bench --hlo-dir DIR` dumped.

For each `*.hlo.txt` in DIR it lists `profiling.materialised_slices`: loop-indexed dynamic slices that a loop fusion
writes out (a copy) rather than a kernel addressing them in place. Each copy counts once as it stands in the
program, not times its loop's trip count. It prints each program's copied bytes beside the full-DSA program's of the
same dump (the ratio within one run) and writes them to `benchmarks/results/<name>.json` with the environment of
the sweep run that dumped the HLO (`--sweep`, its last part) and of this reading.

Run: `python benchmarks/hlo_copies.py --hlo-dir /tmp/hlo --sweep benchmarks/results/e2e_h100.json --name NAME`.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from indexcache_jax.profiling import materialised_slices, write_result_json  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hlo-dir", required=True, help="the folder `indexcache-bench --hlo-dir` wrote")
    ap.add_argument("--sweep", required=True, help="the e2e sweep JSON of the run that dumped the HLO")
    ap.add_argument("--name", required=True)
    args = ap.parse_args(argv)
    paths = sorted(glob.glob(os.path.join(args.hlo_dir, "*.hlo.txt")))
    if not paths:
        raise SystemExit(f"no *.hlo.txt in {args.hlo_dir}")
    with open(args.sweep) as f:
        sweep = json.load(f)
    programs = {}
    for path in paths:
        with open(path) as f:
            programs[os.path.basename(path)] = materialised_slices(f.read())
    full = next((v for k, v in programs.items() if k.startswith("decode_") and set(k.split("_")[1]) == {"F"}), None)
    for name, copies in programs.items():
        ratio = "" if not full or not full["bytes"] else f", {copies['bytes'] / full['bytes']:.0f}x full DSA's"
        print(f"{name}: {copies['count']} copied slices, {copies['bytes'] / 1e6:.0f} MB{ratio}; largest "
              f"{copies['largest'][:3]}")
    path = write_result_json(args.name, {"dumped_by": {"sweep": os.path.basename(args.sweep),
                                                       "environment": sweep["parts"][-1]["environment"],
                                                       "argv": sweep["parts"][-1]["argv"]},
                                         "programs": programs})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
