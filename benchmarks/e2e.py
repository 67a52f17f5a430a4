"""The end-to-end sweep of issue 20 (the paper's Table 1 on one GPU): `indexcache_jax.e2e_bench`, also the CLI
`indexcache-bench`. Run `python benchmarks/e2e.py -h` for its options."""

import sys

from indexcache_jax.e2e_bench import main

if __name__ == "__main__":
    sys.exit(main())
