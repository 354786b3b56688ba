"""The package's version, a leaf every layer may read (events record it)."""

__version__ = "0.1.0"
