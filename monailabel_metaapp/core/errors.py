"""Errors the core raises for bad user input (the app maps them to HTTP 4xx)."""


class VolumeError(ValueError):
    """A file that cannot be used as an image or label (unreadable, wrong geometry, empty mask, ...)."""
