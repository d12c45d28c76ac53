"""gems: Gradient Multi-Subspace tuning (GEMS) for multi-task fine-tuning of language models."""
from gems.errors import BackendUnavailableError, DataError, GemsError, MissingDependencyError, MissingResourceError
from gems.nullspace import IncompatibleNullSpaceError, NullSpace, NullSpaceFormatError
from gems.lowbit import AdamW8bit
from gems.optimizer import GemsOptimizer
from gems.version import __version__

__all__ = ["GemsOptimizer", "AdamW8bit", "NullSpace", "GemsError", "MissingResourceError",
           "MissingDependencyError", "BackendUnavailableError", "DataError",
           "NullSpaceFormatError", "IncompatibleNullSpaceError", "__version__"]
