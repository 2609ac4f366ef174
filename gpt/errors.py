"""One exception type for user mistakes: the scripts turn it into a one-line message and an exit code."""


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, unknown run id...).

    The message must name the key, file or value and say what would be valid.
    """

    exit_code = 2
