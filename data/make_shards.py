"""Make webdataset shards from a table, img2dataset output, or the built-in synthetic set.

Same commands as ``mm shards``:

    python data/make_shards.py csv pairs.csv shards/ --image-root images/ --label-col label
    python data/make_shards.py img2dataset downloaded/ shards/
    python data/make_shards.py builtin data/builtin
    python data/make_shards.py extract data/builtin/test-000000.tar.gz examples/ -n 16
"""
from __future__ import annotations

import argparse
import sys

from mm.cli.shards import add_commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make_shards.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="{csv,img2dataset,builtin,extract}"))
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
