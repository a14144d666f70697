"""Errors a user can cause and fix. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a path, a config value, a flag. The message says what is wrong and the fix."""


class ConfigError(UserError):
    """A configuration value is unknown, of the wrong type, or out of range."""
