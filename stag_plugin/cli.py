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


def usage() -> str:
    lines = ["usage: stag <command> [flags]   (stag <command> --help for its flags)", ""]
    lines += [f"  {name:<9} {help}" for name, (_, help) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"stag: unknown command {command!r}\n{usage()}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[command][0]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
