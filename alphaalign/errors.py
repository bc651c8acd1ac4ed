"""The one exception type for user mistakes.

A `UserError` carries a single line that names the file and the key or line at fault. The CLI prints it
and exits with code 2, without a traceback (unless `--debug`).
"""


class UserError(Exception):
    """A mistake in a recipe, a data file or a command-line argument."""
