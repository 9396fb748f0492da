"""The package's version, in a module of the bottom layer so that every layer may record it."""

__version__ = "0.1.0"
