"""The errors a user can fix, shared by every package: each message names the field, file or
tensor at fault and what to do. Subclasses (e.g. train.checkpoint's DamagedCheckpointError) stay
beside the code that raises them."""
from __future__ import annotations


class ConfigError(ValueError):
    """A job config, model config or checkpoint config we cannot run."""


class CheckpointError(ValueError):
    """A checkpoint (orbax train state or Hugging Face weights) we cannot use: missing, damaged,
    or not matching its config or the state to restore."""


class DoesNotFitError(ConfigError, MemoryError):
    """The config needs more memory per chip than the chip has: the hand estimate
    (opdjax.train.memory) or the TPU compiler's figures (opdjax.aot); the message names the
    phase or term and the fixes."""
