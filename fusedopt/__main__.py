"""Command line: `python -m fusedopt train ...` (the main job) and `... bench ...`."""

import argparse
import importlib
import sys

COMMANDS = {
    "train": ("fusedopt.train", "train an MLP on flattened weight buffers (digits data set)"),
    "bench": ("fusedopt.bench", "measure optimizer-step throughput against peers"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fusedopt",
                                     description="fused optimizer kernels over flat buffers")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(module=module)
        importlib.import_module(module).add_arguments(command)
    args = parser.parse_args(argv)
    return importlib.import_module(args.module).run(args)


if __name__ == "__main__":
    sys.exit(main())
