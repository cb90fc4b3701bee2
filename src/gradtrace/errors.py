"""Errors that reach the user as one line (the CLI maps them to exit code 2)."""


class UserError(Exception):
    """Bad input or a mismatch the user can fix. The message is one line naming the problem and the fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
