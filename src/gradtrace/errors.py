"""Errors that reach the user as one line (the CLI maps them to exit code 2)."""
from __future__ import annotations

import errno


class UserError(Exception):
    """Bad input or a mismatch the user can fix. The message is one line naming the problem and the fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class GradtraceWarning(UserWarning):
    """Something allowed that the user should know (e.g. learning and evaluation queries sampled differently);
    the CLI prints it as one line: `gradtrace COMMAND: warning: ...`."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def os_error_line(exc: OSError) -> str:
    """One line for a filesystem error (full disk, read-only or forbidden path, a file where a folder goes or
    the reverse): what failed, where, and what to do."""
    where = exc.filename if exc.filename is not None else "the output"
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        return (f"no space left on the device holding {where}; free space (or choose another --out) and run the "
                "same command again (finished work is kept)")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write {where} ({exc.strerror}); choose a path you can write to"
    if exc.errno == errno.EISDIR:
        return f"{where} is a directory; pass a file path"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"{where} (or a folder above it) is a file; pass a folder path that is not a file"
    if exc.errno == errno.ENOENT:
        return f"{where} does not exist; check the path"
    return f"{exc.strerror or type(exc).__name__}: {where}"
