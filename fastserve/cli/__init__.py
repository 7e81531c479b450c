"""Shared command-line handling: `--config FILE` plus `key=value` overrides, errors without a traceback."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Sequence

from fastserve.config import Config, ConfigError, load_config


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="YAML config file (defaults apply to everything it leaves out)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override any config field, e.g. train.steps=50 mesh.fsdp=2")
    return p


def load_or_exit(path: str | None, overrides: Sequence[str], cls: type = Config) -> Any:
    try:
        return load_config(path, overrides, cls)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2)


def parse(argv: Sequence[str] | None, description: str) -> Config:
    """Parses argv into a validated Config (exit status 2 with a message naming the key on any error)."""
    args = parser(description).parse_args(argv)
    cfg = load_or_exit(args.config, args.overrides)
    quiet_logs()
    return cfg


def quiet_logs() -> None:
    """INFO from fastserve, WARNING from the libraries. FASTSERVE_LOG_LEVEL=DEBUG adds fastserve's debug log, e.g. the
    full cause of a checkpoint that was reported unreadable in one line."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    level = os.environ.get("FASTSERVE_LOG_LEVEL", "").strip().upper()
    if level:
        try:
            logging.getLogger("fastserve").setLevel(level)
        except ValueError:
            print(f"FASTSERVE_LOG_LEVEL={level}: not a logging level (DEBUG, INFO, WARNING, ERROR)", file=sys.stderr)
