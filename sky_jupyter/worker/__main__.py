"""``python -m sky_jupyter.worker``: start a worker (its configuration comes as one JSON line on stdin)."""

from .start import main

main()
