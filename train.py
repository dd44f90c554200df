"""Train an mm model: `accelerate launch train.py CONFIG.yaml [section.key=value ...]` (or `python train.py ...`).

The same command as `mm train` (the same help, the same one-line `error: ...` and exit code 2 for a bad config);
see README.md and docs/config.md for the keys."""
import sys

from mm.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
