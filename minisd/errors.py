"""minisd's exceptions: every failure a user can cause is one of these, with a message that
names what went wrong, where (file, key, argument, value) and what to do about it."""


class MinisdError(Exception):
    """Base class: catch this to handle every error minisd raises on purpose."""


class CheckpointError(MinisdError):
    """A model folder or weights file is missing, unreadable, corrupt or does not match the model."""


class InputError(MinisdError, ValueError):
    """An argument is invalid: bad prompt, size, step count, guidance, seed, output path."""


class ResourceError(MinisdError):
    """The request needs more than the machine has (memory, disk)."""
