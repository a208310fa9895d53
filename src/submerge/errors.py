"""Typed errors raised on bad input. Messages always name the file, key or field at fault."""


class SubmergeError(Exception):
    """Base class of all submerge errors."""


class CheckpointError(SubmergeError, ValueError):
    """A checkpoint (or a task vector built from it) is unusable: missing or extra keys,
    wrong shapes or dtypes, NaN/Inf values, a hash mismatch, an untrusted pickle."""


class ConfigError(SubmergeError, ValueError):
    """A configuration value is invalid (names the config field)."""
