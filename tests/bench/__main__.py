"""``python -m tests.bench [--rounds N] [--quick] [--out FILE.json]``: see L{tests.bench._run}."""

import sys

from tests.bench._run import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
