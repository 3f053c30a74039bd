"""Every recipe of the image corpus against qemu-img, for the vdi, vpc and qcow2 drivers.

The conftest parametrizes ``recipe`` and ``corrupt_recipe`` over the
recipes of :data:`IMAGE_FORMATS`; a recipe's name starts with its format,
so each test id names the format (``[vdi-dynamic]``, ``[qcow2-corrupt-...]``).
The format-specific tests (headers, sizes, fuzzing) stay in
``test_formats_<format>.py``.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from testbed.errors import BlockError, CorruptImageError

IMAGE_FORMATS = ("vdi", "vpc", "qcow2")


@pytest.mark.images
def test_image_reads_like_qemu_img(
    corpus: Any, chain: Any, recipe: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    image = corpus.image(recipe)
    # An external data file name (qcow2) is relative to the working directory,
    # as in QEMU; qemu-img runs in the image's directory, so the model does too.
    monkeypatch.chdir(os.path.dirname(image.main))
    assert chain.disk_hashes(image) == corpus.expected_chunks(image)


@pytest.mark.images
def test_corrupt_image_is_refused_naming_the_field(
    corpus: Any, chain: Any, corrupt_recipe: dict[str, object]
) -> None:
    image = corpus.image(corrupt_recipe)
    if "backing-loop" in image.tags:
        with pytest.raises(BlockError, match="backing loop"):
            chain.disk_hashes(image)
        return
    field = image.expected_field()
    assert field, f"corrupt recipe {image.name} lacks a field: tag"
    with pytest.raises(CorruptImageError) as caught:
        chain.disk_hashes(image)
    assert caught.value.field == field
    assert caught.value.format == corrupt_recipe["format"]
    assert caught.value.offset is not None
