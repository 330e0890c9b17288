"""The one base class of the errors a user makes and can fix (a setting, a file, a folder).

``run.py`` prints such an error as its message alone, one paragraph that names the setting or file
and the fix, and exits with status 1; any other exception is a bug and keeps its traceback.
HYDRA_FULL_ERROR=1 shows the traceback of a user error too. Light: imported before torch.
"""


class UserError(ValueError):
    """A setting, file or folder that cannot be used as it is; the message names it and the fix."""
