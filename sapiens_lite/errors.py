"""User-facing errors.

A `UserError` is a mistake the user can fix (a missing file, an unknown arch, a bad config key).
The `sapiens` command prints its message on one line and exits with code 2, without a traceback.
Internal invariants use `assert`; everything else raises normally so that bugs keep their traceback.
"""


class UserError(Exception):
    """A mistake in the user's input; the message names the file/key and the problem."""


class ConfigError(UserError, ValueError):
    """A bad configuration key or value."""
