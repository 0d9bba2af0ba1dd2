"""dfre: distributed feature reconstruction errors for machine-learning interatomic potentials."""

from dfre.errors import DfreError

__version__ = "0.1.0"

__all__ = ["DfreError", "__version__"]
