"""The one error type users see: a single line saying what is wrong and what would be right."""


class LaunchError(Exception):
    """Bad input or a refused submission. Printed as one line, exit status 2; nothing submitted."""
