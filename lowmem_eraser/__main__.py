"""`python -m lowmem_eraser ...` = `lowmem-eraser ...`; what `torchrun -m lowmem_eraser train` runs."""

import sys

from .cli import main

sys.exit(main())
