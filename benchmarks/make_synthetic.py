"""Write synthetic correlated features (see ``synthetic.py``) to a Zarr group on disk.

    python benchmarks/make_synthetic.py OUT.zarr --n-envs 258000 --dims 144,512,240,128

Streams block by block, so memory stays bounded whatever ``--n-envs`` is.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from synthetic import PAPER_DIMS, write_synthetic_zarr  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="path of the Zarr group to write (replaced if it exists)")
    p.add_argument("--n-envs", type=int, default=258_000)
    p.add_argument("--dims", default=",".join(map(str, PAPER_DIMS)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-rows", type=int, default=1 << 16)
    args = p.parse_args(argv)
    dims = [int(d) for d in args.dims.split(",")]
    start = time.perf_counter()
    names = write_synthetic_zarr(args.out, args.n_envs, dims, args.seed, chunk_rows=args.chunk_rows)
    size = args.n_envs * sum(dims) * 4 / 1e9
    print(
        f"wrote {args.n_envs} environments x {dims} ({size:.2f} GB float32) as {names} "
        f"to {args.out} in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
