"""The image corpus as the runners see it: ``build/images/index.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import ScenarioSetupError


@dataclass(frozen=True, kw_only=True)
class ImageInfo:
    """One entry of ``build/images/index.json``."""

    name: str
    format: str
    subformat: str | None
    dir: Path
    main: Path  # absolute, inside ``dir``

    @property
    def main_rel(self) -> str:
        return str(self.main.relative_to(self.dir))


def load_index(path: Path) -> dict[str, ImageInfo]:
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ScenarioSetupError(f"no image index {path} (run `make images`)") from err
    except json.JSONDecodeError as err:
        raise ScenarioSetupError(f"image index {path} is not JSON: {err}") from err
    out = {}
    for e in entries:
        out[e["name"]] = ImageInfo(
            name=e["name"],
            format=e["format"],
            subformat=e.get("subformat"),
            dir=Path(e["dir"]),
            main=Path(e["main"]),
        )
    return out
