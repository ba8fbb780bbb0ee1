"""`stag`: the plugin's command line (`stag train | eval | generate | convert | demo`), also
`python -m stag_plugin <command>` (the form torchrun launches).

Each command is a module with `main(argv) -> int`; `stag convert` is a group whose module holds
its own SUBCOMMANDS table. A StagError from any command is printed as one line,
`stag <command>: error: <problem>. Fix: <fix>`, with exit code 2; nothing else is caught.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

from stag_plugin.errors import StagError, Stopped, disk_error

COMMANDS = {
    "train": ("stag_plugin.training.train", "train a StagFormer or plain GPT on Megatron-Core"),
    "eval": ("stag_plugin.training.evaluate", "validation / test perplexity of a checkpoint"),
    "generate": ("stag_plugin.generate", "stream a checkpoint's continuation of a prompt"),
    "convert": ("stag_plugin.convert", "to-inference | reshard | from-gpt (upcycling)"),
    "demo": ("stag_plugin.training.demo",
             "five models on the embedded corpus, compared in a report (`make demo`)"),
}


def usage(prog: str, table: dict) -> str:
    width = max(map(len, table)) + 2
    lines = [f"usage: {prog} <command> [flags]   ({prog} <command> --help for its flags)", ""]
    lines += [f"  {name:<{width}} {help}" for name, (_, help) in table.items()]
    return "\n".join(lines)


def dispatch(prog: str, table: dict, argv: list) -> int:
    """Run `<prog> <command> [flags]` from `table` (command -> (module, one-line help)): the
    module's `main(flags)`, or, for a group, the same dispatch over its SUBCOMMANDS."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(prog, table))
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in table:
        print(f"{prog}: error: unknown command {command!r}\n{usage(prog, table)}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(table[command][0])
    if hasattr(module, "SUBCOMMANDS"):
        return dispatch(f"{prog} {command}", module.SUBCOMMANDS, rest)
    return module.main(rest)


def main(argv=None) -> int:
    from stag_plugin.compat.cpu import quiet_known_warnings

    quiet_known_warnings()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return dispatch("stag", COMMANDS, argv)
    except StagError as err:
        if getattr(err, "report", True):  # (in a multi-rank job, one rank reports)
            print(f"stag {argv[0]}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stag {argv[0]}: interrupted", file=sys.stderr)
        return 130
    except Stopped as stop:
        if os.environ.get("RANK", "0") == "0":
            print(f"stag {argv[0]}: {signal.Signals(stop.signum).name}: {stop.message}",
                  file=sys.stderr)
        return 128 + stop.signum
    except OSError as err:  # a full, read-only or forbidden disk: say so
        if disk_error(err) is None:
            raise
        print(f"stag {argv[0]}: error: {disk_error(err)}", file=sys.stderr)
        return 2
