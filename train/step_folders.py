"""The name of a checkpoint's step folder, shared with launch/ (which must not import jax).

A run's checkpoints are WORKDIR/checkpoints/STEP, STEP in plain decimal: orbax's default
step format, without prefix or zero padding.
"""

import re

STEP_NAME = re.compile(r"^(0|[1-9]\d*)$")
