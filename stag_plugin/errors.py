"""StagError: every error a user of stag_plugin should read (bad config, flags, data, checkpoint,
decoder input) says what is wrong and how to fix it.

    raise StagError("--load runs/x holds no checkpoint", "pass the --save folder of a run")
    str(err)  == "--load runs/x holds no checkpoint. Fix: pass the --save folder of a run"
    `stag <command>` prints it as `stag <command>: error: <problem>. Fix: <fix>` (exit code 2).

A ValueError subclass, so callers that catch ValueError keep working. Plain Python, no imports:
every folder of the package may raise it (the reference model file excepted, which is copied into
inference folders on its own).
"""


class StagError(ValueError):
    """A user-facing error: `problem` (what is wrong) and `fix` (what to do instead)."""

    def __init__(self, problem: str, fix: str):
        self.problem, self.fix = problem.rstrip(". "), fix.rstrip(". ")
        super().__init__(f"{self.problem}. Fix: {self.fix}")


class NotSupported(StagError, NotImplementedError):
    """An option or combination stag_plugin does not implement (also a NotImplementedError)."""
