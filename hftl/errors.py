"""The one base of every error a user can fix: the CLI prints it as `hftl: error: <message>` and exits 2.

Each subclass (ConfigError, DataError, OutputError, CheckpointError, LaunchError, NonFiniteLossError) keeps the
builtin base it had, so `except ValueError` / `except RuntimeError` around hftl calls still catch what they did.
A library exception that a user's input causes is converted into one of them where it arises, with a message that
names the key or file and the fix; anything else escapes as a traceback, which means a bug in hftl.
"""


class UserError(Exception):
    """A problem with the user's input (config, data, files, launch); the message says what to do."""
