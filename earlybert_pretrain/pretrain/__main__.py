"""``python -m earlybert_pretrain.pretrain`` (what the deepspeed launcher's ``--module`` runs)."""

import sys

from earlybert_pretrain.pretrain.cli import main

sys.exit(main())
