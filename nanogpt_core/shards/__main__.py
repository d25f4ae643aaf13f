"""`python -m nanogpt_core.shards build|demo` (see nanogpt_core/data/prepare.py, where it lives)."""

from nanogpt_core.data.prepare import shards_main

shards_main()
