"""The qualgate version (its own module: anything in the package may read it while the package loads)."""

__version__ = "0.1.0"
