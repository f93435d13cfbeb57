"""``fewstep bench <name>``: performance benchmarks, printed as a table and optionally written as JSON.

Each benchmark is a module ``fewstep.benchmarks.<name>`` (contract in ``benchmarks/__init__.py``). Those named in
``BENCHMARKS`` always appear in ``--help``; one whose module is not installed answers with a one-line error.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

from ..cli import UserError

ORDER = 60
BENCHMARKS = {
    "inference": "few-step pipeline latency vs its networks and vs the 50-step CFG teacher",
    "memory": "peak memory of training and inference",
    "methods": "DMD2, DMD and progressive distillation of the digits teacher at a matched budget",
    "data": "peak RSS, encoding throughput and start-up time of training against dataset size",
    "scale": "training samples/s at 1..N processes, collectives and MB all-reduced per iteration",
    "curves": "learning curves: the demo's students' FD, accuracy and recall against iterations",
    "eval": "seconds per image of fewstep eval's rows and metric models (SD1.5 architecture, random weights)",
}


def _module(name: str):
    try:
        return importlib.import_module(f"{__package__.rsplit('.', 1)[0]}.benchmarks.{name}")
    except ModuleNotFoundError as error:
        if error.name and error.name.endswith(f"benchmarks.{name}"):
            return None
        raise


def _missing(name: str):
    def run(args: argparse.Namespace) -> None:
        raise UserError(f"benchmark {name!r} is not available in this install (no module fewstep.benchmarks.{name})")

    return run


def _runner(module):
    def run(args: argparse.Namespace) -> None:
        result = module.run(args)
        print()
        print(module.format_table(result))
        if args.json:
            path = Path(args.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2) + "\n")
            print(f"wrote {path}")

    return run


def register(sub) -> None:
    bench = sub.add_parser("bench", help="performance benchmarks (table and JSON)", description=__doc__.splitlines()[0])
    kinds = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, default_help in BENCHMARKS.items():
        module = _module(name)
        parser = kinds.add_parser(name, help=getattr(module, "HELP", default_help))
        parser.add_argument("--json", metavar="FILE", help="also write the result as JSON")
        if module is None:
            parser.set_defaults(func=_missing(name))
            continue
        module.add_arguments(parser)
        parser.set_defaults(func=_runner(module))
