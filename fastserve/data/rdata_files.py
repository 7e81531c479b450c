"""Objects from an installed R package's datasets, read without R.

R ships a package's `data/` as a lazy-load database: `Rdata.rdx`, a gzip-compressed serialized R list
{variables: name → (offset, length) in Rdata.rdb, references, compressed: 1 | 2 | 3}, and `Rdata.rdb`, the
concatenated records. Each record is a 4-byte big-endian uncompressed length, then (compressed = 3) one type byte —
'Z' raw LZMA2 (xz without its container), '2' bzip2, '1' zlib, '0' stored — then the compressed serialization of
the object; compressed = 1 / 2 have no type byte and are zlib / bzip2. PyPI `rdata` parses the serialization
(data frames come back as pandas DataFrames).
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

from fastserve.data.packages import pypi_module

R_SITE_LIBRARY = Path("/usr/lib/R/site-library")
# R writes LZMA2 with preset 9 (a 64 MiB dictionary); decoding with a dictionary at least that large reads any record
_LZMA2 = [{"id": lzma.FILTER_LZMA2, "dict_size": 1 << 26}]


class RDataError(ValueError):
    """A lazy-load database that cannot be read as such (wrong file, unknown compression, missing object)."""


def _rdata(what: str) -> Any:
    return pypi_module("rdata", "rdata", what)


def _parse(serialized: bytes, what: str) -> Any:
    rdata = _rdata(what)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # rdata warns about ALTREP classes it expands; the values are right
        return rdata.conversion.convert(rdata.parser.parse_data(serialized, extension=".rds"))


def _decompress(record: bytes, compressed: int, where: str) -> bytes:
    if len(record) < 5:
        raise RDataError(f"{where}: record of {len(record)} bytes is too short")
    size = struct.unpack(">I", record[:4])[0]
    body = record[4:]
    kind = {1: b"1", 2: b"2"}.get(compressed)
    if kind is None:                       # compressed = 3: the type byte says how
        kind, body = body[:1], body[1:]
    if kind == b"Z":
        out = lzma.decompress(body, format=lzma.FORMAT_RAW, filters=_LZMA2)
    elif kind == b"2":
        out = bz2.decompress(body)
    elif kind == b"1":
        out = zlib.decompress(body)
    elif kind == b"0":
        out = body
    else:
        raise RDataError(f"{where}: unknown compression type {kind!r} (expected Z, 2, 1 or 0)")
    if len(out) != size:
        raise RDataError(f"{where}: decompressed to {len(out)} bytes, the record says {size}")
    return out


class LazyLoadDB:
    """The datasets of one R package's `data/` directory (Rdata.rdx + Rdata.rdb)."""

    def __init__(self, data_dir: str | Path):
        self.data_dir = Path(data_dir)
        index_path = self.data_dir / "Rdata.rdx"
        self.rdb_path = self.data_dir / "Rdata.rdb"
        for p in (index_path, self.rdb_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p} does not exist: not an R lazy-load data directory")
        try:
            index = _parse(gzip.decompress(index_path.read_bytes()), f"reading {index_path}")
        except (OSError, EOFError, ValueError) as e:
            raise RDataError(f"{index_path} is not a gzip-compressed R index: {e}") from e
        if not isinstance(index, dict) or "variables" not in index:
            raise RDataError(f"{index_path}: expected an index list with 'variables', got {type(index).__name__}")
        self._where = {str(k): (int(v[0]), int(v[1])) for k, v in index["variables"].items()}
        compressed = index.get("compressed", [1])
        self.compressed = int(compressed[0] if hasattr(compressed, "__len__") else compressed)

    @property
    def names(self) -> list[str]:
        """Names of the objects the database holds."""
        return sorted(self._where)

    def read(self, name: str) -> Any:
        """The object `name`, converted by `rdata` (a data frame becomes a pandas DataFrame)."""
        if name not in self._where:
            raise RDataError(f"{self.data_dir} has no object {name!r}; it has {', '.join(self.names)}")
        offset, length = self._where[name]
        with open(self.rdb_path, "rb") as f:
            f.seek(offset)
            record = f.read(length)
        if len(record) != length:
            raise RDataError(f"{self.rdb_path} is truncated: {name!r} needs bytes {offset}..{offset + length}")
        where = f"{self.rdb_path}[{name}]"
        return _parse(_decompress(record, self.compressed, where), f"reading {where}")


def package_data_dir(package: str, library: str | Path = R_SITE_LIBRARY) -> Path:
    """Where an installed R package keeps its lazy-load datasets."""
    return Path(library) / package / "data"


def read_r_object(package: str, name: str, library: str | Path = R_SITE_LIBRARY) -> Any:
    """Object `name` from the datasets of installed R package `package` (e.g. ("modeldata", "training_data"))."""
    return LazyLoadDB(package_data_dir(package, library)).read(name)
