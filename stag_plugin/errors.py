"""StagError: every error a user of stag_plugin should read (bad config, flags, data, checkpoint,
decoder input) says what is wrong and how to fix it.

    raise StagError("--load runs/x holds no checkpoint", "pass the --save folder of a run")
    str(err)  == "--load runs/x holds no checkpoint. Fix: pass the --save folder of a run"
    `stag <command>` prints it as `stag <command>: error: <problem>. Fix: <fix>` (exit code 2).

A ValueError subclass, so callers that catch ValueError keep working. Plain Python, no imports:
every folder of the package may raise it (the reference model file excepted, which is copied into
inference folders on its own).
"""

import errno


class StagError(ValueError):
    """A user-facing error: `problem` (what is wrong) and `fix` (what to do instead)."""

    def __init__(self, problem: str, fix: str):
        self.problem, self.fix = problem.rstrip(". "), fix.rstrip(". ")
        super().__init__(f"{self.problem}. Fix: {self.fix}")

    def __reduce__(self):
        # Picklable whatever a subclass's constructor takes: torch.distributed gathers the
        # exceptions of failed ranks (e.g. in a distributed checkpoint load) by pickling them.
        return _restore, (type(self), self.args, self.__dict__)


def _restore(cls, args, state):
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class NotSupported(StagError, NotImplementedError):
    """An option or combination stag_plugin does not implement (also a NotImplementedError)."""


class MissingDependency(StagError, ImportError):
    """A feature that needs an optional package which is not installed or does not load (also
    an ImportError); `fix` says how to install it or what to use instead."""


def causes(err: BaseException):
    """`err` and every exception behind it: causes, contexts, and the per-rank failures torch's
    distributed checkpointing collects (CheckpointException.failures: rank -> (exc, trace))."""
    seen, pending = set(), [err]
    while pending:
        current = pending.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [current.__cause__, current.__context__]
        failures = getattr(current, "failures", None)
        for failure in (failures.values() if isinstance(failures, dict) else ()):
            pending.append(failure[0] if isinstance(failure, tuple) else failure)


_DISK_FIXES = {
    errno.ENOSPC: "free space on that disk, or write somewhere else",
    errno.EDQUOT: "free space in your quota, or write somewhere else",
    errno.EACCES: "choose a folder you may write to, or fix its permissions",
    errno.EPERM: "choose a folder you may write to, or fix its permissions",
    errno.EROFS: "choose a folder on a writable file system",
}


def disk_error(err: BaseException):
    """A StagError for a full, read-only or forbidden disk behind `err`, or None."""
    for cause in causes(err):
        if isinstance(cause, OSError) and cause.errno in _DISK_FIXES:
            where = f" ({cause.filename})" if cause.filename else ""
            return StagError(f"cannot write{where}: {cause.strerror}",
                             _DISK_FIXES[cause.errno])
    return None


class Stopped(BaseException):
    """The user stopped a command (SIGINT / SIGTERM); `message` says what was kept. A
    BaseException, like KeyboardInterrupt: nothing on the way catches it as an error."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(signum, message)
        self.signum, self.message = signum, message

    def __reduce__(self):
        return Stopped, (self.signum, self.message)
