"""Errors a user can fix.

Everything the user can repair themselves (a typo in a recipe, a malformed data file, a missing
model) raises :class:`TunesmithError`. The command line prints its message as one sentence and
exits with status 2 instead of showing a traceback; anything else is a bug and keeps its traceback.
"""


class TunesmithError(Exception):
    """An error the user can fix; the CLI prints its message as one sentence without a traceback."""
