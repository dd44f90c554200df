"""Draw the built-in synthetic captioned data set (the README's main command trains on it).

    python data/make_builtin.py                    # -> data/builtin/{train,test}-*.tar.gz + info.json
    python data/make_builtin.py /tmp/shapes --n-train 50000 --seed 1

Same as ``mm shards builtin``; see mm/data/synthetic.py for what is drawn.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mm.cli.shards import BUILTIN_DESCRIPTION, add_builtin_arguments, run_builtin


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make_builtin.py", description=BUILTIN_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_builtin_arguments(parser)
    parser.set_defaults(out_dir=str(Path(__file__).resolve().parent / "builtin"))  # data/builtin from any cwd
    return run_builtin(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
