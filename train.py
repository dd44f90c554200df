"""Train an mm model: `accelerate launch train.py CONFIG.yaml [section.key=value ...]` (or `python train.py ...`,
or `mm train ...`). See README.md and mm/train/config.py for the keys."""
import sys

from mm.train.trainer import main

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) > 1 else 2)
    config = sys.argv[1] if not ("=" in sys.argv[1] and not sys.argv[1].endswith((".yaml", ".yml", ".json"))) else None
    overrides = sys.argv[2:] if config else sys.argv[1:]
    sys.exit(main(config, overrides))
