"""`stag`: the plugin's command line (`stag train | eval | generate | convert | demo`), one module
per command."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("stag_plugin.train", "train a StagFormer or plain GPT on Megatron-Core"),
    "eval": ("stag_plugin.evaluate", "validation / test perplexity of a checkpoint"),
    "generate": ("stag_plugin.generate", "stream a checkpoint's continuation of a prompt"),
    "convert": ("stag_plugin.convert", "to-inference | reshard | from-gpt (upcycling)"),
    "demo": ("stag_plugin.demo", "the main job: four models on the embedded corpus, a report"),
}


def usage(prog: str, table: dict) -> str:
    width = max(map(len, table)) + 2
    lines = [f"usage: {prog} <command> [flags]   ({prog} <command> --help for its flags)", ""]
    lines += [f"  {name:<{width}} {help}" for name, (_, help) in table.items()]
    return "\n".join(lines)


def dispatch(prog: str, table: dict, argv) -> int:
    """Run `<prog> <command> [flags]`: the `main(flags)` of the module `table[command]` names
    (table: command -> (module, one-line help))."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(prog, table))
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in table:
        print(f"{prog}: error: unknown command {command!r}\n{usage(prog, table)}",
              file=sys.stderr)
        return 2
    return importlib.import_module(table[command][0]).main(rest)


def main(argv=None) -> int:
    return dispatch("stag", COMMANDS, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
