"""The catalog's values: compact JSON in UTF-8.

Every record the catalog holds is read and written through these two
functions. orjson does the common case several times faster than the
standard library, which matters when a query or a rebuild touches every
record of a large archive. Whatever orjson refuses goes through the
standard library instead, so that the values written and read are the
same as they always were:

- a string holding a lone surrogate (orjson will not encode it; the
  standard library's strict UTF-8 refuses it too, with its own error);
- an integer beyond 64 bits, or a dict key that is not a string;
- bytes that are not strict UTF-8 (none are written, but a value is read
  as leniently as before).

Both libraries write the same compact form: no spaces, non-ASCII as
UTF-8, keys in insertion order. Floats may be spelled differently
(``1e-05`` against ``1e-5``); they read back as the same number. (A float
that is not a number, which no record holds, would read back as null.)
"""

from __future__ import annotations

import json
from typing import Any

import orjson

_standard = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def dumps(value: Any) -> bytes:
    """``value`` as the catalog stores it."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return _standard(value).encode()


def loads(raw: bytes | memoryview) -> Any:
    """A stored value."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(bytes(raw).decode("utf-8", "surrogatepass"))
