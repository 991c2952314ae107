"""Exception types whose messages are meant to be shown to users as one line."""

from __future__ import annotations


class OferError(Exception):
    """Base class for errors that carry a complete, one-line message for the user."""


class AssetError(OferError, FileNotFoundError):
    """A required asset (FLAME model, landmark embedding, weights) is missing or invalid."""


class UnsafePickleError(OferError):
    """A pickle referenced something outside the allow-list and was refused."""


class ConfigError(OferError, ValueError):
    """A configuration key is unknown, mistyped or has an invalid value."""


class CheckpointError(OferError):
    """A checkpoint is missing, of the wrong kind, or does not match the model."""


class ImageError(OferError):
    """An input image could not be read or contains no usable face."""
