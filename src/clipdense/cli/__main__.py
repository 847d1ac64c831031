"""``python -m clipdense.cli ...`` (e.g. under ``torchrun -m clipdense.cli train CONFIG``)."""

import sys

from clipdense.cli import main

sys.exit(main())
