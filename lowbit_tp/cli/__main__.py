"""``python -m lowbit_tp.cli`` (also how torchrun and the vLLM re-exec start the command)."""
import sys

from lowbit_tp.cli import main

sys.exit(main())
