"""``python -m fastpatch``: versions, backend choice per device, kernel checks (see :mod:`fastpatch.selfcheck`)."""
import sys

from .selfcheck import main

sys.exit(main(sys.argv[1:]))
