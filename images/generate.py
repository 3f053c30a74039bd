#!/usr/bin/env python3
"""Make the image corpus from the recipes in ``manifest.d/*.toml``.

Each recipe is a table ``[[image]]`` with:

``name``     directory under the output root (unique across all manifests)
``format``   QEMU's driver name of the image to open (``raw``, ``qcow2``,
             ``vmdk``, ``vpc``, ``vdi``, ``vvfat``)
``main``     the file (or, for vvfat, the directory) to open, relative to
             the image's directory
``subformat`` optional: vmdk createType, vpc/vdi variant, ...
``steps``    shell commands run with ``bash -e`` in the image's directory
             (real qemu-img/qemu-io from Debian's qemu-utils)
``corrupt``  optional bool: a deliberately broken image for error tests
``tags``     optional list of strings

Recipes are rebuilt only when their text changes (a stamp holds its hash),
so ``make images`` is quick the second time.  An ``index.json`` at the
output root lists every image with its absolute main path.

Usage: ``python3 images/generate.py [--out build/images] [--only GLOB] [-j N]``
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import shutil
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_recipes(manifest_dir: Path) -> list[dict[str, object]]:
    recipes: list[dict[str, object]] = []
    seen: dict[str, Path] = {}
    for path in sorted(manifest_dir.glob("*.toml")):
        with path.open("rb") as f:
            data = tomllib.load(f)
        for recipe in data.get("image", []):
            for key in ("name", "format", "main", "steps"):
                if key not in recipe:
                    raise SystemExit(f"{path}: recipe {recipe.get('name', '?')!r} lacks {key!r}")
            name = str(recipe["name"])
            if name in seen:
                raise SystemExit(f"{path}: image name {name!r} already used in {seen[name]}")
            seen[name] = path
            recipe["manifest"] = path.name
            recipes.append(recipe)
    return recipes


def recipe_hash(recipe: dict[str, object]) -> str:
    text = json.dumps(recipe, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_one(recipe: dict[str, object], out: Path) -> tuple[str, str]:
    name = str(recipe["name"])
    target = out / name
    stamp = target / ".recipe-hash"
    digest = recipe_hash(recipe)
    if stamp.exists() and stamp.read_text() == digest:
        return name, "cached"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for step in recipe["steps"]:  # type: ignore[attr-defined]
        proc = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", str(step)],
            cwd=target,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise SystemExit(
                f"image {name}: step failed (exit {proc.returncode}): {step}\n"
                f"{proc.stdout}{proc.stderr}"
            )
    stamp.write_text(digest)
    return name, "built"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE.parent / "build" / "images")
    parser.add_argument("--only", default="*", help="build only recipes whose name matches")
    parser.add_argument("-j", "--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    if shutil.which("qemu-img") is None:
        print("generate.py: qemu-img not found (apt-get install qemu-utils)", file=sys.stderr)
        return 1
    recipes = [
        r for r in load_recipes(HERE / "manifest.d") if fnmatch.fnmatch(str(r["name"]), args.only)
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        for name, how in pool.map(lambda r: build_one(r, args.out), recipes):
            print(f"  {how:6}  {name}")
    index = [
        {
            "name": r["name"],
            "format": r["format"],
            "subformat": r.get("subformat"),
            "main": str((args.out / str(r["name"]) / str(r["main"])).resolve()),
            "dir": str((args.out / str(r["name"])).resolve()),
            "corrupt": bool(r.get("corrupt", False)),
            "tags": list(r.get("tags", [])),  # type: ignore[call-overload]
        }
        for r in load_recipes(HERE / "manifest.d")
        if (args.out / str(r["name"]) / ".recipe-hash").exists()
    ]
    (args.out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"{len(recipes)} image recipe(s) ready under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
