"""``python -m rnnkit.tune.worker SPEC``: one of ``rnnkit tune --jobs J``'s worker processes
(its threads and GPU are set in its environment by the parent)."""
from __future__ import annotations

import sys


def main() -> int:
    from rnnkit.config import ConfigError
    from rnnkit.data.vocab import DataError
    from rnnkit.tune.study import StudySpec
    from rnnkit.tune.workers import _die_with_parent, work

    _die_with_parent()
    try:
        interrupted = work(StudySpec.from_json(sys.argv[1]), lambda line: print(line, flush=True))
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 143 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
