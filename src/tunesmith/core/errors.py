"""Errors a user can fix.

Everything the user can repair themselves (a typo in a recipe, a malformed data file, a missing
model) raises :class:`TunesmithError`. The command line prints its message as one sentence and
exits with status 2 instead of showing a traceback; anything else is a bug and keeps its traceback.
"""


class TunesmithError(Exception):
    """An error the user can fix; the CLI prints its message as one sentence without a traceback."""


def missing_file(path: object, what: str) -> TunesmithError:
    """The error for a ``what`` (``recipe file``) at ``path`` that is not a file: a folder, or nothing at all."""
    import os

    if os.path.isdir(str(path)):
        return TunesmithError(f"{what} {path} is a folder, not a file; give the file itself")
    return TunesmithError(f"{what} {path} does not exist")


def decode_utf8(path: object, data: bytes, what: str = "file") -> str:
    """``data`` (the bytes of ``path``) as text, a leading byte-order mark dropped.

    Raises:
        TunesmithError: If the bytes are not UTF-8, naming the line and the byte.
    """
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise TunesmithError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{data[error.start]:02x}); re-save the {what} as UTF-8"
        ) from None
