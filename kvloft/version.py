"""The kvloft version: written into saves and reported by the server (one place; kvloft/__init__.py re-exports it)."""

__version__ = "0.1.0"  # keep equal to pyproject.toml [project] version
