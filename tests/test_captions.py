"""Captioned sources: MS-COCO, caption folders, img2dataset tars, synthetic-captions; U-ViT's crop."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image
from t2i_data import (
    COCO_IMAGES,
    EMPTY_CAPTION_ID,
    NO_CAPTION_ID,
    expected_captions,
    jpeg,
    make_coco,
    uvit_center_crop,
)

from pipeline.inputs.captions import CaptionedSource, open_input, parse_caption_lines
from pipeline.inputs.images import SkipImage, center_crop_uvit, decode_image
from pipeline.inputs.sources import SourceError
from pipeline.inputs.synth import SHAPES, write_image_folder, write_wds_shards
from pipeline.inputs.synth_captions import COLOURS, SHAPE_WORDS, combinations, held_out_pairs, prompts

# ----------------------------------------------------------------------------------------------
# U-ViT's crop


@pytest.mark.parametrize("h,w", [(37, 53), (53, 37), (64, 64), (101, 200), (300, 299), (20, 21)])
def test_center_crop_uvit_matches_uvit_source(h, w):
    a = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    ours = np.asarray(center_crop_uvit(Image.fromarray(a), 32))
    assert np.array_equal(ours, uvit_center_crop(32, 32, a))


def test_decode_image_uvit_crop_ignores_exif_and_differs_from_adm():
    arr = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90: ADM's path applies it, U-ViT's does not (Image.open().convert("RGB"))
    buf = io.BytesIO()
    img.save(buf, format="PNG", exif=exif)
    uvit = decode_image(buf.getvalue(), 32, crop="center-crop-uvit", apply_exif=False)
    assert np.array_equal(uvit, uvit_center_crop(32, 32, arr))
    assert not np.array_equal(uvit, decode_image(buf.getvalue(), 32))


# ----------------------------------------------------------------------------------------------
# COCO


def test_coco_every_caption_in_file_order_keys_are_ids(tmp_path):
    split = make_coco(tmp_path)
    src = open_input(str(split))                                   # recognised without the prefix
    assert isinstance(src, CaptionedSource) and src.kind == "coco" and src.location == f"coco:{split.resolve()}"
    ids = sorted([i for i, _, _ in COCO_IMAGES] + [NO_CAPTION_ID])
    assert [it.key for it in src.items] == [str(i) for i in ids]   # sorted ids: U-ViT's MSCOCODatabase order
    got = dict(zip((it.key for it in src.items), src.captions))
    for key, caps in expected_captions().items():
        assert list(got[key]) == caps                               # interleaved file order per image
    assert got[str(NO_CAPTION_ID)] == ()
    assert src.uncaptioned == {str(NO_CAPTION_ID): "no caption (missing annotation)"}
    reasons = dict(src.dropped)
    assert reasons[f"{EMPTY_CAPTION_ID}#ann9001"] == "empty caption"
    assert reasons["25#ann9002"] == "caption is not a string (NoneType)"
    assert len(src.dropped) == 2                                    # the unknown-image caption is ignored
    item = src.items[[it.key for it in src.items].index(str(NO_CAPTION_ID))]
    with pytest.raises(SkipImage, match="missing annotation"):
        src.load(item, 32, 1 << 30)
    first = src.items[0]
    raw = np.array(Image.open(first.path).convert("RGB"))
    assert np.array_equal(src.load(first, 32, 1 << 30), uvit_center_crop(32, 32, raw))


def test_coco_identity_captions_key_only_the_text(tmp_path):
    split = make_coco(tmp_path)
    a = open_input(f"coco:{split}")
    ann = tmp_path / "annotations" / "captions_train2014.json"
    data = json.loads(ann.read_text())
    data["annotations"][0]["caption"] = "a different caption"
    ann.write_text(json.dumps(data))
    b = open_input(f"coco:{split}")
    assert a.identity() == b.identity() and a.captions_sha256() != b.captions_sha256()
    data["annotations"] = [x for x in data["annotations"] if x["image_id"] != 9]   # image 9 loses its captions
    ann.write_text(json.dumps(data))
    assert open_input(f"coco:{split}").identity() != a.identity()                  # it is skipped everywhere now


def test_coco_errors_name_the_file(tmp_path):
    split = make_coco(tmp_path)
    (tmp_path / "annotations" / "captions_train2014.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(SourceError, match="captions_train2014.json is not a COCO captions file"):
        open_input(f"coco:{split}")
    (tmp_path / "annotations" / "captions_train2014.json").unlink()
    with pytest.raises(SourceError, match=r"COCO captions not found: .*annotations/captions_train2014.json"):
        open_input(f"coco:{split}")


def test_coco_lone_surrogate_caption_is_dropped(tmp_path):
    split = make_coco(tmp_path, bad=False)
    ann = tmp_path / "annotations" / "captions_train2014.json"
    text = ann.read_text().replace('"Closeup of bins', '"\\ud800 Closeup of bins')   # invalid UTF-16 in JSON
    ann.write_text(text)
    src = open_input(f"coco:{split}")
    assert dict(src.dropped) == {"9#ann" + str(_ann_id(ann, "\ud800 Closeup")): "caption is not UTF-8"}
    assert list(src.captions[[it.key for it in src.items].index("9")]) == expected_captions()["9"][1:]


def _ann_id(path, prefix) -> int:
    return next(a["id"] for a in json.loads(path.read_text())["annotations"]
                if isinstance(a["caption"], str) and a["caption"].startswith(prefix))


# ----------------------------------------------------------------------------------------------
# caption folders and img2dataset tars


def test_parse_caption_lines():
    caps, dropped = parse_caption_lines(b"\xef\xbb\xbfa cat\r\n\nbad \xff byte\n  \nlast line\n", "k")
    assert caps == ["a cat", "last line"]
    assert dropped == [("k#1", "empty caption"), ("k#2", "caption is not UTF-8"), ("k#3", "empty caption")]


def test_caption_folder(tmp_path):
    root = tmp_path / "data"
    write_image_folder(root, 6, 2, 40, fmt="png")           # class_000/img_000000.png ...
    for i, p in enumerate(sorted(root.rglob("*.png"))):
        if i == 1:
            continue                                         # no .txt: skipped
        text = "first caption\nsecond caption\n" if i == 0 else ("\n" if i == 2 else f"caption {i}\n")
        p.with_suffix(".txt").write_text(text)
    src = open_input(str(root))
    assert src.kind == "captions-folder" and src.location.startswith("captions:")
    keys = [it.key for it in src.items]
    assert keys == sorted(keys) and len(keys) == 6
    assert src.captions[0] == ("first caption", "second caption")
    assert src.uncaptioned == {keys[1]: "no caption (.txt missing)", keys[2]: "no usable caption in its .txt"}
    assert src.dropped == ((f"{keys[2]}#0", "empty caption"),)


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_img2dataset_tars(tmp_path):
    img = jpeg(np.full((40, 50, 3), 120, np.uint8))
    _tar(tmp_path / "00000.tar", [
        ("000000000.jpg", img), ("000000000.txt", b"a grey square"),
        ("000000000.json", json.dumps({"caption": "ignored: .txt wins", "url": "x"}).encode()),
        ("000000001.png", img), ("000000001.json", json.dumps({"caption": "from json", "status": "success"}).encode()),
        ("000000002.webp", img), ("000000002.json", json.dumps({"captions": ["one", "", "two"]}).encode()),
        ("000000003.jpg", img)])
    src = open_input(str(tmp_path))
    assert src.kind == "captions-wds"
    assert dict(zip((it.key for it in src.items), src.captions)) == {
        "000000000": ("a grey square",), "000000001": ("from json",), "000000002": ("one", "two"), "000000003": ()}
    assert src.dropped == (("000000002#1", "empty caption"),)
    assert src.load(src.items[0], 32, 1 << 30).shape == (32, 32, 3)


def test_class_sources_still_open_as_before(tmp_path):
    write_image_folder(tmp_path / "folder", 4, 2, 32)
    write_wds_shards(tmp_path / "wds", 4, 2, 32)
    assert type(open_input(str(tmp_path / "folder"))).__name__ == "Source"
    assert type(open_input(str(tmp_path / "wds"))).__name__ == "Source"
    with pytest.raises(SourceError, match="for captioned sources"):
        open_input(str(tmp_path / "folder"), crop="center-crop-uvit")


# ----------------------------------------------------------------------------------------------
# synthetic-captions


def test_synthetic_captions_hold_out_combinations():
    src = open_input("synthetic-captions:60", synthetic_seed=3)
    words = {(h["shape"], h["colour"]) for h in src.details["held_out_pairs"]}
    assert words == {(SHAPE_WORDS[SHAPES[s]], COLOURS[c][0]) for s, c in held_out_pairs(3)}
    assert len(words) == 6 and len({s for s, _ in words}) == 6            # one colour per shape
    assert [len(c) for c in src.captions[:6]] == [1, 2, 3, 1, 2, 3]       # variable K
    for caps in src.captions:                                             # "a red circle on ..." never held out
        colour, shape = caps[0].split(" on ")[0].split()[-2:]
        assert (shape, colour) not in words
    assert len(combinations(3)) + len(combinations(3, held_out=True)) == 6 * 8 * 4 * 7
    held_prompts = prompts(3, held_out=True)
    assert len(held_prompts) == 6 * 4 * 7
    assert all(tuple(p.split(" on ")[0].split()[-2:][::-1]) in words for p in held_prompts)
    again = open_input("synthetic-captions:60", synthetic_seed=3)
    assert again.captions == src.captions
    assert np.array_equal(src.load(src.items[5], 32, 0), again.load(again.items[5], 32, 0))
    assert open_input("synthetic-captions:60", synthetic_seed=4).identity() != src.identity()
