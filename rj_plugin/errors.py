"""Exception hierarchy of rj_plugin: every error the package raises on purpose is an ``RJError``."""

from __future__ import annotations


class RJError(Exception):
    """Base class of all errors raised deliberately by rj_plugin."""


class ModelLoadError(RJError):
    """A model could not be loaded (missing, unreadable or unconvertible file, unknown name)."""


class InputError(RJError):
    """An input file or value is malformed (e.g. a VNN-LIB file that cannot be parsed)."""


class UnsupportedLayerError(RJError):
    """The network contains a layer or operation that the bound computation does not support."""


class ConfigError(RJError):
    """An option or combination of options is invalid."""
