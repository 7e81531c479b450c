"""`python -m fastserve.data prepare NAME [key=value …]` checks (and converts, once) the real data a source reads,
and says which package to install when one is missing; `python -m fastserve.data list` lists the sources.

A source opts in by giving its config dataclass a `prepare(self) -> str` method (a one-line description of what
is ready); sources without one (embedded or synthetic data) have nothing to prepare.
"""
from __future__ import annotations

import argparse
import sys

from fastserve import registry
from fastserve.data.packages import MissingPackage


def prepare(name: str, overrides: list[str]) -> str:
    """Prepares data source `name` with `data.` overrides given as key=value; returns what is ready."""
    from fastserve.config_parsing import _build, override_dict

    if name not in registry.DATA_SOURCES:
        raise SystemExit(f"unknown data source {name!r}; sources: {', '.join(sorted(registry.DATA_SOURCES))}")
    cls = registry.resolve(registry.DATA_SOURCES[name])
    fields = override_dict(overrides)
    if "source" in cls.__dataclass_fields__:
        fields["source"] = name
    source = _build(cls, fields, prefix="data")  # the same checks as in a config file
    if not hasattr(source, "prepare"):
        return f"{name}: nothing to prepare (embedded or synthetic data)"
    return source.prepare()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastserve.data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="check / convert the real data a source reads")
    p.add_argument("name")
    p.add_argument("overrides", nargs="*", help="key=value fields of the source's config")
    sub.add_parser("list", help="list the data sources")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name in sorted(registry.DATA_SOURCES):
            cls = registry.resolve(registry.DATA_SOURCES[name])
            print(f"{name:20s} {'prepare' if hasattr(cls, 'prepare') else '-'}")
        return 0
    from fastserve.config_parsing import ConfigError

    try:
        print(prepare(args.name, args.overrides))
    except (MissingPackage, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
