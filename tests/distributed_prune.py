"""Runs `prunekit prune` once per case, in this process; test_distributed.py launches it under torchrun.

One launch for every case: starting two processes (and importing torch in each) costs far more than the
tiny prunes themselves.

    python -m torch.distributed.run --standalone --nproc-per-node 2 distributed_prune.py CASES.json

CASES.json: a list of argument lists, each as `prunekit` takes them.
"""

import json
import sys
from pathlib import Path

from prunekit.cli import app


def main() -> None:
    for args in json.loads(Path(sys.argv[1]).read_text()):
        status = app(args, standalone_mode=False)
        if status:  # a one-line error was printed; stop as the command would
            sys.exit(status)


if __name__ == "__main__":
    main()
