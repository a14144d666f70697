"""Errors the envs layer raises on purpose, so callers can catch them by type."""

from __future__ import annotations


class MissingDependencyError(ImportError):
    """An optional dependency (a ``pyproject.toml`` extra) that this env needs is not installed.

    The message names the package, the install command for the extra, and anything else the
    extra needs that pip cannot install (``requirements``), with where the docs are.
    """

    def __init__(self, package: str, extra: str, requirements: str = "", docs: str = ""):
        message = (
            f'{package} is not installed: install the extra with `pip install -e ".[{extra}]"`'
        )
        if requirements:
            message += f" plus {requirements}"
        if docs:
            message += f"; see {docs}"
        super().__init__(message, name=package)
        self.package = package
        self.extra = extra


class EnvFailedError(RuntimeError):
    """A game instance kept failing: rebuilding it did not give a working episode."""
