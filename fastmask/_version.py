"""The one place of fastmask's version (pyproject.toml reads it; the package, mask files and `fastmask info` report
it)."""

__version__ = "0.2.0"
