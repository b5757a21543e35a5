"""edgekd: distil an image classifier from a big teacher to a small edge student."""

__version__ = "0.1.0"
