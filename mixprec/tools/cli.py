"""`python -m mixprec <command>`: info, bench, inspect, selftest, demo."""
from __future__ import annotations

import argparse
import importlib
import json
import sys


class UsageError(Exception):
    """Arguments a command cannot work with, found before it starts its work: main() reports it as argparse reports
    its own errors (the command's usage line, `error: ...`, exit code 2), with no traceback."""


def _cmd_info(args) -> int:
    from mixprec.tools.info import format_info, info

    d = info()
    print(json.dumps(d, indent=2) if args.json else format_info(d))
    return 0


def load_train_example():
    """examples/train.py, installed by setup.py as mixprec.examples.train."""
    return importlib.import_module("mixprec.examples.train")


def _cmd_demo(args) -> int:
    return load_train_example().main(args.demo_args)


def _cmd_bench(args) -> int:
    from mixprec.tools import bench

    return bench.main(args, args.argv[1:])


def _cmd_inspect(args) -> int:
    from mixprec.tools import inspector

    return inspector.main(args)


def _cmd_selftest(args) -> int:
    from mixprec.tools import selftest

    return selftest.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mixprec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, what the extension was built with, devices, backend choice")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info, parser=p)

    from mixprec.tools import bench, inspector, selftest  # light modules: torch and triton load inside their commands

    p = sub.add_parser("bench", help="run the kernel microbenchmarks, print a table, write JSON/CSV/plots")
    bench.add_arguments(p)
    p.set_defaults(func=_cmd_bench, parser=p)
    p = sub.add_parser("inspect", help="GPU kernels without a GPU: registers, spills, smem, occupancy, "
                                       "tensor-core instructions, roofline prediction")
    inspector.add_arguments(p)
    p.set_defaults(func=_cmd_inspect, parser=p)
    p = sub.add_parser("selftest", help="check every op and backend on this device against mixprec.reference, "
                                        "then print the benchmark table")
    selftest.add_arguments(p)
    p.set_defaults(func=_cmd_selftest, parser=p)
    # add_help=False and parse_known_args in main(): every demo option (--help included) goes to examples/train.py
    p = sub.add_parser("demo", help="train small real models in fp32, fp16 and bf16; table and PNG "
                                    "(`demo --help` for its options)", add_help=False)
    p.set_defaults(func=_cmd_demo, parser=p)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "demo":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.demo_args = rest
    args.argv = argv  # bench records its own command line
    try:
        return args.func(args)
    except UsageError as exc:
        args.parser.error(str(exc))  # exits with code 2


if __name__ == "__main__":
    sys.exit(main())
