"""The errors covseg reports to a user: one message that names the file (or key) and the problem."""


class CovsegError(Exception):
    """A problem with the user's input; the command line prints it as one error and exits 1."""


class DataError(CovsegError, ValueError):
    """Bad input data; the message names the file and the problem."""


class ParamsError(CovsegError, ValueError):
    """A params.yaml key or an override is unknown or has a value that is not allowed."""
