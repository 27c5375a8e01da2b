"""``python -m clipsam.serve --bundle DIR``: the same as ``clipsam serve`` without the CLI's imports."""

from __future__ import annotations

import sys

from clipsam.errors import ClipSamError
from clipsam.serve import serve_main


def main() -> int:
    """Run :func:`serve_main` on ``sys.argv``; a ClipSamError is one line and exit status 2."""
    try:
        return serve_main(sys.argv[1:])
    except ClipSamError as exc:
        print(f"clipsam: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
