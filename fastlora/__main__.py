"""``python -m fastlora`` (and ``torchrun -m fastlora``): the ``fastlora`` command."""
import sys

from .cli import main

sys.exit(main())
