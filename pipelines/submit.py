"""Submit a pipeline as a Ray job with this checkout as its working dir, and follow its output.

    python pipelines/submit.py -- python pipelines/train.py --data /data/shards/voc --workers 2
    python pipelines/submit.py --address http://HOST:8265 --no-wait -- python pipelines/tune.py --space ...

What ``ray job submit --working-dir . -- ...`` does, plus: the address and token of the Ray head
``make up`` started are found without exports (``--address`` or an http ``$RAY_ADDRESS`` name
another cluster, whose token comes from ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN[_PATH]``);
the working dir is packed with Ray's own rules (``.gitignore`` and ``.rayignore`` exclude data and
outputs) and refused in one line, naming the largest entries, when it exceeds Ray's 100 MiB
upload limit; and the console shows the job's own output, not Ray's upload messages. The exit
status is the job's (``2`` for a request the script refused). Ctrl-C stops the job.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssd.distributed.submission import SubmitError, submit


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", help="job-submission address http://HOST:PORT (default: $RAY_ADDRESS if it is "
                                     "one, else the head `make up` started)")
    p.add_argument("--working-dir", type=Path, default=ROOT, help="uploaded with the job (default: this checkout)")
    p.add_argument("--no-wait", action="store_true", help="return once the job is submitted")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the job's command")
    return p


def main(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise SystemExit("error: give the job's command after --, e.g. -- python pipelines/train.py")
    try:
        return submit(command, working_dir=args.working_dir.resolve(), address=args.address, wait=not args.no_wait)
    except SubmitError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
