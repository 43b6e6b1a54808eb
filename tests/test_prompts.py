"""Eval prompts: COCO val in sorted image-id order (one caption per image), prompt files, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from t2i_data import COCO_IMAGES, make_coco

from pipeline.inputs.prompts import open_prompts, prompts_sha256, select_prompts
from pipeline.inputs.sources import SourceError


@pytest.fixture(scope="module")
def coco_val(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_coco(tmp_path_factory.mktemp("coco"), "val2014")


def test_coco_entries_are_images_in_sorted_id_order_with_their_captions(coco_val: Path) -> None:
    src = open_prompts(f"coco:{coco_val}")
    expected = sorted(COCO_IMAGES)                       # U-ViT MSCOCODatabase: sorted(coco.imgs.keys())
    assert src.kind == "coco" and src.keys == tuple(str(i) for i, _, _ in expected)   # uncaptioned 42 left out
    assert [list(c) for c in src.captions] == [caps for _, _, caps in expected]      # annotation order
    assert open_prompts(str(coco_val)).captions == src.captions                      # the unprefixed layout too


def test_caption_choice_is_a_function_of_seed_and_index_only(coco_val: Path) -> None:
    src = open_prompts(f"coco:{coco_val}")
    n = len(src)
    full, entries = select_prompts(src, 0, range(3 * n))
    assert entries.tolist() == [i % n for i in range(3 * n)]                         # entry i mod E
    assert all(p in src.captions[e] for p, e in zip(full, entries))
    again, _ = select_prompts(src, 0, range(3 * n))
    assert again == full                                                             # deterministic
    some, some_entries = select_prompts(src, 0, [13, 2, 7])                          # any subset, any order
    assert some == [full[13], full[2], full[7]] and some_entries.tolist() == [13 % n, 2, 7]
    other, _ = select_prompts(src, 1, range(3 * n))
    assert other != full                                                             # the seed matters
    multi = [i for i in range(3 * n) if len(src.captions[i % n]) > 1]
    assert len({full[i] for i in multi if i % n == 3}) > 1                           # random per image, not per entry
    picks = [src.captions[i % n].index(full[i]) for i in multi]
    assert min(picks) == 0 and max(picks) >= 1                                       # not always the first
    first, _ = select_prompts(src, 5, range(n), caption="first")
    assert first == [c[0] for c in src.captions]
    assert prompts_sha256(full) == prompts_sha256(again) != prompts_sha256(other)


def test_prompt_file_order_blank_lines_and_bom(tmp_path: Path) -> None:
    f = tmp_path / "prompts.txt"
    f.write_bytes("\ufeffa red square\r\n\n  \nune île, café\nthree cats".encode())
    src = open_prompts(f"file:{f}")
    assert src.kind == "file" and src.captions == (("a red square",), ("une île, café",), ("three cats",))
    assert src.keys == ("line 1", "line 4", "line 5")
    assert open_prompts(str(f)).captions == src.captions                             # a .txt path without file:
    prompts, entries = select_prompts(src, 3, range(5))
    assert prompts == ["a red square", "une île, café", "three cats", "a red square", "une île, café"]
    assert entries.tolist() == [0, 1, 2, 0, 1]


def test_bad_prompt_sources_fail_clearly(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(SourceError, match="has no prompt"):
        open_prompts(f"file:{empty}")
    with pytest.raises(SourceError, match="prompt file .*missing.txt"):
        open_prompts(f"file:{tmp_path / 'missing.txt'}")
    with pytest.raises(SourceError, match="not a caption source"):
        open_prompts("synthetic:8")
    with pytest.raises(ValueError, match="caption must be"):
        select_prompts(open_prompts("synthetic-captions:4"), 0, [0], caption="last")  # type: ignore[arg-type]


def test_synthetic_captions_work_as_prompts() -> None:
    src = open_prompts("synthetic-captions:6")
    prompts, entries = select_prompts(src, 0, range(6))
    assert entries.tolist() == list(range(6)) and all(p in c for p, c in zip(prompts, src.captions))
    assert np.all([len(c) == 1 + i % 3 for i, c in enumerate(src.captions)])
