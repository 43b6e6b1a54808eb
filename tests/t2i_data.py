"""Text-to-image test data, written the way the real tools write it (independently of our readers).

- ``make_coco``: MS-COCO 2014 as downloaded: ``train2014/COCO_train2014_<id:012d>.jpg`` of assorted
  sizes and ``annotations/captions_train2014.json`` with the real file's fields and key order
  (info, images, licenses, annotations), annotations interleaved across images as in the real file.
- ``make_uvit_features``: what U-ViT ``scripts/extract_mscoco_feature.py`` + HASTE's PNG addition write:
  U-ViT ``center_crop`` (re-implemented here from its source), x / 127.5 - 1, ``encode_moments`` (the
  raw mean ++ logvar of the KL autoencoder: ``quant_conv(encoder(x))``), ``save_image`` of the [-1, 1]
  tensor (HASTE, SPEC §7.16), the CLIP contexts of every caption and ``empty_context.npy``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.inputs.synth import synth_image

# (image id, (width, height), captions in the annotation file's interleaved order)
COCO_IMAGES = [
    (391895, (80, 60), ["A man with a red helmet on a small moped on a dirt road. ", "Man riding a motor bike on a dirt road on the countryside."]),
    (522418, (60, 90), ["A woman wearing a net on her head cutting a cake. ", "A woman cutting a large white sheet cake.", "A woman wearing a hair net cutting a large sheet cake."]),
    (184613, (70, 70), ["A child holding a flowered umbrella and petting a yak.", "A young man holding an umbrella next to a herd of cattle."]),
    (318219, (96, 64), ["A young boy standing in front of a computer keyboard.", "a little boy wearing headphones and looking at a computer monitor", "He is listening intently to the computer at school.", "A young boy stares up at the computer monitor."]),
    (554625, (64, 100), ["a boy wearing headphones using one computer in a long row of computers"]),
    (9, (72, 66), ["Closeup of bins of food that include broccoli and bread.", "A meal is presented in brightly colored plastic trays."]),
    (25, (66, 81), ["A giraffe eating food from the top of the tree.", "A giraffe standing up nearby a tree "]),
    (30, (90, 68), ["A flower vase is sitting on a porch stand.", "White vase with different colored flowers sitting inside of it. "]),
    (34, (64, 64), ["A zebra grazing on lush green grass in a field.", "Zebra reaching its head down to ground where grass is. "]),
    (36, (75, 95), ["Woman in swim suit holding parasol on sunny day.", "A woman posing for the camera, holding a pink, open umbrella."]),
]
NO_CAPTION_ID = 42             # listed in "images" with no annotation: skipped in every group
EMPTY_CAPTION_ID = 522418      # gets one extra empty caption: dropped, the image keeps its others


def jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def coco_image(index: int, size: tuple[int, int]) -> np.ndarray:
    """A synthetic picture of the given (width, height)."""
    arr, _ = synth_image(index, 4, 128)
    return np.asarray(Image.fromarray(arr).resize(size, Image.BICUBIC))


def make_coco(root: Path, split: str = "train2014", bad: bool = True) -> Path:
    """Write a tiny COCO; returns the split folder. ``bad`` adds an uncaptioned image, an empty caption,
    a non-string caption and a caption naming an unknown image id."""
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    entries = COCO_IMAGES + ([(NO_CAPTION_ID, (64, 70), [])] if bad else [])
    images, annotations = [], []
    for n, (img_id, (w, h), _) in enumerate(entries):
        name = f"COCO_{split}_{img_id:012d}.jpg"
        (root / split / name).write_bytes(jpeg(coco_image(n, (w, h))))
        images.append({"license": 3, "file_name": name, "coco_url": f"http://images.cocodataset.org/{split}/{name}",
                       "height": h, "width": w, "date_captured": "2013-11-14 16:28:13",
                       "flickr_url": f"http://farm4.staticflickr.com/1/{img_id}_z.jpg", "id": img_id})
    ann_id = 48
    for k in range(max(len(c) for _, _, c in entries)):  # interleaved: caption k of every image, then k + 1
        for img_id, _, caps in entries:
            if k < len(caps):
                annotations.append({"image_id": img_id, "id": ann_id, "caption": caps[k]})
                ann_id += 1
    if bad:
        annotations.insert(3, {"image_id": EMPTY_CAPTION_ID, "id": 9001, "caption": "   "})
        annotations.insert(5, {"image_id": 25, "id": 9002, "caption": None})
        annotations.append({"image_id": 777777, "id": 9003, "caption": "an image that is not in the list"})
    data = {"info": {"description": "COCO 2014 Dataset", "url": "http://cocodataset.org", "version": "1.0",
                     "year": 2014, "contributor": "COCO Consortium", "date_created": "2017/09/01"},
            "images": images,
            "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 3,
                          "name": "Attribution-NonCommercial-ShareAlike License"}],
            "annotations": annotations}
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(data))
    return root / split


def expected_captions() -> dict[str, list[str]]:
    """key -> captions in annotation order, as the COCO source must give them (bad ones dropped)."""
    return {str(i): list(c) for i, _, c in COCO_IMAGES}


# ----------------------------------------------------------------------------------------------
# U-ViT / HASTE features


def uvit_center_crop(width: int, height: int, img: np.ndarray) -> np.ndarray:
    """U-ViT datasets.py ``center_crop``, as written there (numpy slicing, then LANCZOS)."""
    crop = np.min(img.shape[:2])
    img = img[(img.shape[0] - crop) // 2: (img.shape[0] + crop) // 2,
              (img.shape[1] - crop) // 2: (img.shape[1] + crop) // 2]
    img = Image.fromarray(img, "RGB")
    img = img.resize((width, height), Image.LANCZOS)
    return np.array(img).astype(np.uint8)


@torch.no_grad()
def make_uvit_features(coco_split: Path, out: Path, vae, clip, size: int, save_png: bool = True,
                       png_mode: str = "haste") -> Path:
    """U-ViT's extract loop over ``MSCOCODatabase`` (sorted image ids, captions in file order).

    ``png_mode``: "haste" = HASTE's ``save_image(x in [-1, 1])`` (clipped); "uint8" = the crop saved as is.
    """
    from torchvision.utils import save_image

    ann = json.loads((coco_split.parent / "annotations" / f"captions_{coco_split.name}.json").read_text())
    files = {im["id"]: im["file_name"] for im in ann["images"]}
    caps: dict[int, list[str]] = {i: [] for i in files}
    for a in ann["annotations"]:
        if a["image_id"] in caps:
            caps[a["image_id"]].append(a["caption"])
    out.mkdir(parents=True, exist_ok=True)
    for idx, key in enumerate(sorted(files)):
        raw = np.array(Image.open(coco_split / files[key]).convert("RGB")).astype(np.uint8)
        crop = uvit_center_crop(size, size, raw)
        x = (crop.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)[None]
        if save_png:
            if png_mode == "haste":
                save_image(torch.tensor(x), out / f"{idx}.png")
            else:
                Image.fromarray(crop).save(out / f"{idx}.png")
        moments = vae.quant_conv(vae.encoder(torch.tensor(x)))[0]   # U-ViT encode_moments: mean ++ logvar
        np.save(out / f"{idx}.npy", moments.numpy())
        good = [c for c in caps[key] if isinstance(c, str)]  # U-ViT would crash on None; empty strings it encodes
        if good:
            for k, c in enumerate(clip(good).numpy()):
                np.save(out / f"{idx}_{k}.npy", c)
    np.save(out.parent / "empty_context.npy", clip([""])[0].numpy())
    return out


def frozen_clip_embedder(tokenizer, model, max_length: int = 77):
    """U-ViT libs/clip.py ``FrozenCLIPEmbedder.forward``, as written there."""
    @torch.no_grad()
    def encode(text):
        batch_encoding = tokenizer(text, truncation=True, max_length=max_length, return_length=True,
                                   return_overflowing_tokens=False, padding="max_length", return_tensors="pt")
        tokens = batch_encoding["input_ids"]
        return model(input_ids=tokens).last_hidden_state
    return encode
