"""`python -m checkpoints_convert SRC_HF_DIR DST_DIR [--dtype bfloat16|float32] [--pattern P] [--overwrite]`."""

from checkpoints_convert.cli import main

raise SystemExit(main())
