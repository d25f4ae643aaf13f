import sys

from nanogpt_core.hf.cli import main

sys.exit(main())
