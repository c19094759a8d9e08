"""Ray job entry point: ``python -m pipelines.job NAME [overrides...]`` executes one stage."""

import logging
import sys

from pipelines.config import load_config
from pipelines.executor import execute
from pipelines.graph import Graph


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    logging.basicConfig(level=logging.INFO, format="[unclip] %(message)s", stream=sys.stdout)
    cfg = load_config(argv[1:])
    execute(Graph(), cfg, argv[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
