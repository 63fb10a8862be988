#!/usr/bin/env python3
"""Challenge container entry: segment /input/images/... into /output/images/... with the shipped model.

Paths come from flags or environment variables so the same script runs on folders outside a
container (the tests do that):

    MIPSEG_CHALLENGE_INPUT   (default /input/images)
    MIPSEG_CHALLENGE_OUTPUT  (default /output/images)
    MIPSEG_CHALLENGE_MODEL   (default /opt/mipseg/model.zip)
    MIPSEG_CHALLENGE_DEVICE  (default auto: CUDA when the container sees a GPU)

Exit status 2 with one line on bad input (no images, a bad model package).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=os.environ.get("MIPSEG_CHALLENGE_INPUT", "/input/images"))
    parser.add_argument("--output", default=os.environ.get("MIPSEG_CHALLENGE_OUTPUT", "/output/images"))
    parser.add_argument("--model", default=os.environ.get("MIPSEG_CHALLENGE_MODEL", "/opt/mipseg/model.zip"))
    parser.add_argument("--device", default=os.environ.get("MIPSEG_CHALLENGE_DEVICE", "auto"))
    args = parser.parse_args(argv)

    from mipseg.errors import InputError
    from mipseg.ship.challenge import predict_challenge

    try:
        written = predict_challenge(args.input, args.output, args.model, device=args.device)
    except InputError as error:
        for problem in error.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    print(f"{len(written)} segmentation(s) in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
