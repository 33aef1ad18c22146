"""The built-in synthetic data set: procedural scenes written in the official formats, no download needed.

Each image has 1-3 stuff regions (horizontal bands with wavy borders, one texture per class) and a few
non-overlapping thing instances (one colour and shape per class). Scenes are written as

    train2017/, val2017/                                    images (PNG, lossless, so files are bit-identical)
    annotations/panoptic_{train,val}2017.json + PNG folder   COCO panoptic (things and stuff, crowd flags)
    annotations/instances_{train,val}2017.json               COCO instance (polygons; crowd as RLE)
    ADEChallengeData2016/{images,annotations}/{training,validation}/, objectInfo150.csv
                                                             semantic, ADE20K style (0 = ignore, k + 1 = class k)

and read back by the ordinary readers (study/data/coco.py, study/data/semantic.py). Everything is a pure
function of (seed, split, image index), so a data set is bit-for-bit reproducible; :func:`ensure_synthetic`
generates it once into a folder and reuses it.

The classes are chosen to be easy to learn (distinct colours, shapes and textures), so a tiny model trained
for a few CPU minutes reaches a clearly non-zero PQ. Sizes, counts and probabilities below are our choices.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from scipy.ndimage import binary_dilation

from study.data.source import DataError

VERSION = 1  # bump when the generator changes, so cached folders made by an older version are not reused

# (COCO-style category id, name, shape, base RGB). Ids are deliberately not contiguous (COCO's are not),
# so readers' id mapping is exercised.
THINGS = [(1, "disk", "circle", (220, 40, 40)),
          (2, "box", "square", (40, 70, 220)),
          (3, "triangle", "triangle", (245, 215, 40))]
STUFF = [(92, "sky", "gradient", (150, 200, 240)),
         (93, "grass", "noise", (70, 150, 60)),
         (94, "wall", "bricks", (140, 110, 90))]
MAX_THINGS = 4  # per image
THING_SIZE = (0.12, 0.3)  # object diameter as a fraction of the image side
CROWD_PROB = 0.1  # chance that one thing of an image (with >= 2 things) is flagged crowd
SPLITS = {"train": ("train2017", "training", 0), "val": ("val2017", "validation", 1_000_000)}


def categories() -> list[dict]:
    """COCO panoptic categories, sorted by id (things first): the contiguous order readers produce."""
    return [{"id": i, "name": n, "isthing": 1, "color": list(c), "supercategory": "shape"}
            for i, n, _, c in THINGS] + \
           [{"id": i, "name": n, "isthing": 0, "color": list(c), "supercategory": "texture"}
            for i, n, _, c in STUFF]


def _polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[float]:
    """Vertices [x0, y0, x1, y1, ...] of a circle (24-gon), square or triangle."""
    n = {"circle": 24, "square": 4, "triangle": 3}[shape]
    t = angle + 2 * np.pi * np.arange(n) / n
    return np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], 1).ravel().round(2).tolist()


def _rasterise(poly: list[float], size: int) -> np.ndarray:
    # pycocotools is what every COCO reader uses to decode polygons: drawing with it makes the panoptic
    # PNG and the instance polygons agree pixel for pixel.
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([poly], size, size))).astype(bool)


def _texture(kind: str, color, size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size, 3) float image of one stuff class."""
    base = np.array(color, dtype=np.float32)
    y, x = np.mgrid[0:size, 0:size]
    if kind == "gradient":  # sky: lighter towards the top
        img = base * (1.1 - 0.25 * y[..., None] / size)
    elif kind == "noise":  # grass: speckled
        img = base + rng.normal(0, 14, (size, size, 1))
    else:  # wall: bricks, mortar lines every 8 rows and staggered every 12 columns
        mortar = (y % 8 == 0) | ((x + (y // 8 % 2) * 6) % 12 == 0)
        img = np.where(mortar[..., None], base * 0.55, base)
    return img.astype(np.float32)


def make_scene(size: int, rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    """One scene: uint8 image (size, size, 3) and its segments, each a dict with category_id, mask (bool),
    iscrowd and, for things, the polygon."""
    # Stuff: k bands from top to bottom, borders y = y_b + A sin(2 pi x / wavelength + phase).
    k = int(rng.integers(1, len(STUFF) + 1))
    order = rng.permutation(len(STUFF))[:k]
    x = np.arange(size)
    borders = np.sort(rng.uniform(0.2, 0.8, k - 1)) if k > 1 else np.zeros(0)
    if k == 3 and borders[1] - borders[0] < 0.2:
        borders = np.array([0.33, 0.66])
    region = np.zeros((size, size), dtype=np.int64)
    for b in borders:
        wave = b * size + 0.05 * size * np.sin(2 * np.pi * x / rng.uniform(0.5, 1.5) / size + rng.uniform(0, 6.3))
        region += np.arange(size)[:, None] >= wave[None, :]
    image = np.zeros((size, size, 3), np.float32)
    for band, s in enumerate(order):
        _, _, kind, color = STUFF[s]
        image = np.where((region == band)[..., None], _texture(kind, color, size, rng), image)

    # Things: placed one by one, rejected when they would touch another (so each is one whole polygon).
    things, occupied = [], np.zeros((size, size), bool)
    for _ in range(int(rng.integers(1, MAX_THINGS + 1))):
        for _attempt in range(30):
            c = int(rng.integers(len(THINGS)))
            cat, _, shape, color = THINGS[c]
            r = rng.uniform(*THING_SIZE) * size / 2
            cx, cy = rng.uniform(r, size - r, 2)
            poly = _polygon(shape, cx, cy, r, rng.uniform(0, 2 * np.pi))
            m = _rasterise(poly, size)
            if m.sum() >= 20 and not (m & binary_dilation(occupied, iterations=2)).any():
                break
        else:
            continue
        occupied |= m
        tint = np.array(color, np.float32) + rng.integers(-20, 21, 3)
        image[m] = tint + rng.normal(0, 6, (int(m.sum()), 3))
        things.append({"category_id": cat, "mask": m, "iscrowd": 0, "polygon": poly})
    if len(things) >= 2 and rng.random() < CROWD_PROB:
        things[-1]["iscrowd"] = 1

    stuff = []
    for band, s in enumerate(order):
        m = (region == band) & ~occupied
        if m.any():
            stuff.append({"category_id": STUFF[s][0], "mask": m, "iscrowd": 0})
    return np.clip(image, 0, 255).round().astype(np.uint8), things + stuff


def _bbox(m: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(m)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def _uncompressed_rle(m: np.ndarray) -> dict:
    """COCO's uncompressed RLE (as its crowd annotations use): run lengths of the column-major mask,
    starting with a run of zeros."""
    flat = m.ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat[0]:
        runs = [0] + runs
    return {"counts": runs, "size": [int(m.shape[0]), int(m.shape[1])]}


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # the semantic layout shares the image files
    except OSError:
        shutil.copyfile(src, dst)


def generate(root: str | Path, image_size: int = 128, num_train: int = 400, num_val: int = 100,
             seed: int = 0) -> Path:
    """Write the synthetic data set into ``root`` (created; should be new or empty). Returns ``root``."""
    root = Path(root)
    cats = categories()
    contig = {c["id"]: i for i, c in enumerate(cats)}
    ade = root / "ADEChallengeData2016"
    for split, count in (("train", num_train), ("val", num_val)):
        coco_split, ade_split, id_offset = SPLITS[split]
        dirs = [root / coco_split, root / "annotations" / f"panoptic_{coco_split}",
                ade / "images" / ade_split, ade / "annotations" / ade_split]
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        images, pan_anns, inst_anns = [], [], []
        for i in range(count):
            rng = np.random.default_rng([seed, id_offset, i])  # each image depends only on (seed, split, i)
            image, segs = make_scene(image_size, rng)
            image_id, name = id_offset + i + 1, f"{id_offset + i + 1:012d}.png"
            Image.fromarray(image).save(dirs[0] / name)
            images.append({"id": image_id, "file_name": name, "height": image_size, "width": image_size})
            ids = np.zeros((image_size, image_size), np.int64)
            semantic = np.zeros((image_size, image_size), np.uint8)  # 0 = ignore (never left here)
            infos = []
            for j, s in enumerate(segs):
                seg_id = s["category_id"] * 1000 + j + 1  # unique in the image, < 256^3
                ids[s["mask"]] = seg_id
                semantic[s["mask"]] = contig[s["category_id"]] + 1
                area = int(s["mask"].sum())
                infos.append({"id": seg_id, "category_id": s["category_id"], "iscrowd": s["iscrowd"],
                              "bbox": _bbox(s["mask"]), "area": area})
                if "polygon" in s:
                    inst_anns.append({
                        "id": len(inst_anns) + 1 + id_offset,  # from 1: pycocotools ignores id 0
                        "image_id": image_id, "category_id": s["category_id"], "iscrowd": s["iscrowd"],
                        "segmentation": _uncompressed_rle(s["mask"]) if s["iscrowd"] else [s["polygon"]],
                        "area": float(area), "bbox": [float(v) for v in _bbox(s["mask"])]})
            rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
            Image.fromarray(rgb).save(dirs[1] / name)
            _link(dirs[0] / name, dirs[2] / name)
            Image.fromarray(semantic).save(dirs[3] / name)
            pan_anns.append({"image_id": image_id, "file_name": name, "segments_info": infos})
        info = {"description": f"study synthetic data set v{VERSION}, seed {seed}"}
        with open(root / "annotations" / f"panoptic_{coco_split}.json", "w") as f:
            json.dump({"info": info, "images": images, "annotations": pan_anns, "categories": cats}, f)
        with open(root / "annotations" / f"instances_{coco_split}.json", "w") as f:
            json.dump({"info": info, "images": images, "annotations": inst_anns,
                       "categories": [c for c in cats if c["isthing"]]}, f)
    with open(ade / "objectInfo150.csv", "w", newline="") as f:  # the ADE20K class list, our classes
        w = csv.writer(f)
        w.writerow(["Idx", "Ratio", "Train", "Val", "Stuff", "Name"])
        for i, c in enumerate(cats):
            w.writerow([i + 1, 0, num_train, num_val, 1 - c["isthing"], c["name"]])
    params = _params(image_size, num_train, num_val, seed)
    (root / "synthetic.json").write_text(json.dumps(params, indent=1))  # written last: marks completion
    return root


def _params(image_size: int, num_train: int, num_val: int, seed: int) -> dict:
    return {"version": VERSION, "image_size": image_size, "num_train": num_train, "num_val": num_val,
            "seed": seed}


def default_root(image_size: int = 128, num_train: int = 400, num_val: int = 100, seed: int = 0) -> Path:
    """Cache folder named after the parameters: $STUDY_CACHE (default ~/.cache/study)/synthetic-..."""
    cache = Path(os.environ.get("STUDY_CACHE", "~/.cache/study")).expanduser()
    return cache / f"synthetic-v{VERSION}-s{image_size}-n{num_train}-{num_val}-seed{seed}"


def ensure_synthetic(root: Optional[str | Path] = None, image_size: int = 128, num_train: int = 400,
                     num_val: int = 100, seed: int = 0) -> Path:
    """The synthetic data set folder, generated on first use and reused afterwards.

    Generation goes to a temporary sibling folder renamed into place at the end, so an interrupted run
    leaves no half-written data set and two processes generating at once both end with a complete one.
    """
    params = _params(image_size, num_train, num_val, seed)
    root = Path(root).expanduser() if root else default_root(image_size, num_train, num_val, seed)
    meta = root / "synthetic.json"
    if meta.is_file():
        found = json.loads(meta.read_text())
        if found != params:
            raise DataError(f"{root} holds a synthetic data set made with {found}, not {params}; delete the "
                            f"folder or set data.root to another one")
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root} exists and is not a synthetic data set (no synthetic.json); set data.root "
                        f"to a new folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    generate(tmp, image_size, num_train, num_val, seed)
    try:
        os.replace(tmp, root)  # atomic; replaces an empty folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not meta.is_file():  # nobody else finished it either: a real error
            raise
    return root
