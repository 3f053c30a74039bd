"""QEMU's option syntax as the model reads it: ``-drive``/``-blockdev`` keyval and ``json:`` names.

``util/keyval.c`` and ``QemuOpts``: ``key=value`` pairs separated by
commas, a doubled comma ``,,`` standing for a comma inside a value, dotted
keys (``file.filename=X``) building nested objects.  ``-blockdev`` also
takes a JSON object when its argument starts with ``{``.  Values stay
strings (``on``/``off`` are read where a boolean is wanted); the model
only needs the structure.

A ``json:{...}`` file name (``block.c``'s ``parse_json_filename``) is a
whole blockdev option tree given as a file name: the drivers are named, so
QEMU does not probe the protocol.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from testbed.errors import BlockError


def split_keyval(text: str) -> list[tuple[str, str]]:
    """``a=1,b=x,,y`` -> ``[("a", "1"), ("b", "x,y")]``; a bare word is ``(word, "")``."""
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        key_end = i
        while key_end < n and text[key_end] not in "=,":
            key_end += 1
        key = text[i:key_end]
        if not key:
            raise BlockError(f"empty option name at position {i} of {text!r}")
        if key_end >= n or text[key_end] == ",":
            pairs.append((key, ""))
            i = key_end + 1
            continue
        value: list[str] = []
        j = key_end + 1
        while j < n:
            if text[j] == ",":
                if j + 1 < n and text[j + 1] == ",":
                    value.append(",")
                    j += 2
                    continue
                break
            value.append(text[j])
            j += 1
        pairs.append((key, "".join(value)))
        i = j + 1
    return pairs


def parse_keyval(text: str, *, implied: str | None = None) -> dict[str, Any]:
    """Nested options from ``key=value,...``; a first bare word is ``implied``'s value."""
    out: dict[str, Any] = {}
    for index, (key, value) in enumerate(split_keyval(text)):
        if index == 0 and implied is not None and not value and "=" not in text.split(",")[0]:
            key, value = implied, key
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise BlockError(
                    f"option {key!r} of {text!r}: {part!r} is both a value and a group"
                )
            node = child
        if isinstance(node.get(parts[-1]), dict):
            raise BlockError(f"option {key!r} of {text!r} is both a value and a group")
        node[parts[-1]] = value
    return out


def parse_blockdev_arg(text: str) -> dict[str, Any]:
    """``-blockdev``'s argument: JSON when it starts with ``{``, keyval otherwise."""
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise BlockError(f"-blockdev {text!r}: not JSON: {err}") from err
        if not isinstance(value, dict):
            raise BlockError(f"-blockdev {text!r}: not a JSON object")
        return value
    return parse_keyval(text)


def json_filename(name: str, fmt: str | None) -> tuple[str | None, str]:
    """(format driver, protocol file name) of a ``json:{...}`` file name."""
    try:
        tree = json.loads(name[len("json:") :])
    except json.JSONDecodeError as err:
        raise BlockError(f"Could not parse the JSON options of {name!r}: {err}") from err
    if not isinstance(tree, Mapping):
        raise BlockError(f"{name!r}: the JSON options are not an object")
    flat = _flatten(tree)
    driver = flat.get("driver")
    if flat.get("file.driver", "file") != "file" or (driver == "file" and "file.driver" in flat):
        raise BlockError(f"{name!r}: only a format over driver 'file' is modelled")
    if driver == "file":
        path, driver = flat.get("filename"), "raw"
    else:
        path = flat.get("file.filename")
    if not isinstance(path, str) or not path:
        raise BlockError(f"{name!r}: no file.filename in the JSON options")
    if fmt is not None and driver is not None and fmt != driver:
        raise BlockError(f"{name!r}: format={fmt} conflicts with the JSON driver {driver!r}")
    return (fmt or (driver if isinstance(driver, str) else None)), path


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def flag(value: Any, *, what: str) -> bool:
    """A boolean as QMP (true/false) or the command line (on/off) spells it."""
    if isinstance(value, str):
        if value not in ("on", "off", "true", "false", "yes", "no"):
            raise BlockError(f"{what}: {value!r} is not a boolean (on/off)")
        return value in ("on", "true", "yes")
    return bool(value)
