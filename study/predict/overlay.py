"""Overlay PNGs: a prediction drawn over its image, and several models' side by side.

An overlay has the image's size. Each segment is tinted with its class's colour (one colour per class, the
same in every image and every model of a comparison; instances of a class in lighter and darker shades),
outlined, and labelled with its class name and score at the centre of its thickest part. A legend in a corner
lists the classes drawn. The choices of this file are ours (the paper shows no overlays): a tint of 55%, labels
left off segments too thin to hold them or smaller than twice the label (they stay in the legend), labels moved
off the legend and off each other, and instance predictions drawn only from ``min_score`` up (the raw file
keeps all of them).
"""
from __future__ import annotations

import colorsys
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from study.predict.run import Segment

TINT = 0.55  # the colour's share in a segment's pixels (ours)
GOLDEN = 0.618033988749895  # hue step between class colours: consecutive classes get distant hues


def class_colour(label: int, shade: int = 0) -> tuple[int, int, int]:
    """A class's colour (hue by the golden-ratio sequence); ``shade`` k > 0 lightens or darkens it for the
    k-th further instance of the class."""
    value = 0.95 - 0.18 * (shade % 4) if shade else 0.95
    sat = 0.70 if shade % 2 == 0 else 0.45
    r, g, b = colorsys.hsv_to_rgb((0.08 + label * GOLDEN) % 1.0, sat, value)
    return int(255 * r), int(255 * g), int(255 * b)


def font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def font_size(hw: tuple[int, int]) -> int:
    """Text height for an image: about 1/28 of its shorter side, at least 11 px."""
    return max(11, round(min(hw) / 28))


def _anchor(mask: np.ndarray) -> tuple[int, int, float]:
    """(x, y) of the pixel deepest inside ``mask`` and its distance to the border (on every s-th pixel of a
    large image, s = shorter side // 512, which keeps a photo's distance transforms fast)."""
    s = max(1, min(mask.shape) // 512)
    small = mask[::s, ::s]
    dist = ndimage.distance_transform_edt(np.pad(small, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(dist.argmax()), dist.shape)
    return int(x) * s, int(y) * s, float(dist[y, x]) * s


Rect = tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive)


def _overlaps(a: Rect, b: Rect) -> bool:
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def _place(box: tuple[int, int], centre: tuple[int, int], canvas: tuple[int, int], taken: list[Rect],
           pad: int) -> Rect:
    """Where a label box of size ``box`` goes: centred on ``centre`` (kept inside the canvas); when that covers
    the legend or an earlier label, the nearest of the positions beside, above and below what it covers that is
    free; when none is, the centred one."""
    (w, h), (W, H) = box, canvas

    def inside(x: int, y: int) -> Rect:
        x = min(max(0, x), max(0, W - w - 1))
        y = min(max(0, y), max(0, H - h - 1))
        return x, y, x + w, y + h

    first = inside(centre[0] - w // 2, centre[1] - h // 2)
    hits = [r for r in taken if _overlaps(first, r)]
    if not hits:
        return first
    options = []
    for r in hits:
        options += [inside(r[0] - w - pad, first[1]), inside(r[2] + pad, first[1]),
                    inside(first[0], r[1] - h - pad), inside(first[0], r[3] + pad)]
    free = [o for o in options if not any(_overlaps(o, r) for r in taken)]
    if not free:
        return first
    return min(free, key=lambda o: abs(o[0] - first[0]) + abs(o[1] - first[1]))


def draw_overlay(image: np.ndarray, segments: list[Segment], names: list[str], min_score: Optional[float] = None,
                 show_scores: bool = True) -> np.ndarray:
    """``segments`` over ``image`` (uint8 (H, W, 3)): an image of the same size. ``names``: class names in
    contiguous order. ``min_score``: segments below it are not drawn (the legend says how many). Labels are
    moved off the legend and off each other where there is room."""
    hidden = 0
    if min_score is not None:
        hidden = sum(s.score < min_score for s in segments)
        segments = [s for s in segments if s.score >= min_score]
    order = sorted(range(len(segments)), key=lambda i: segments[i].score)  # the best on top
    shade: dict[int, int] = {}
    colours = []
    for s in segments:
        colours.append(class_colour(s.label, shade.get(s.label, 0)))
        shade[s.label] = shade.get(s.label, 0) + 1
    out = image.astype(np.float32)
    edges = np.zeros(image.shape[:2], bool)
    for i in order:
        m = segments[i].mask
        out[m] = (1 - TINT) * out[m] + TINT * np.asarray(colours[i], np.float32)
        edges |= m & ~ndimage.binary_erosion(m)
    out[edges] = 255.0
    canvas = Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    size = font_size(image.shape[:2])
    fnt = font(size)
    legend = _legend(draw, segments, colours, names, size, hidden, min_score)
    taken = [legend]
    pad = max(1, size // 6)
    for i in reversed(order):  # the best placed first
        s = segments[i]
        text = f"{names[s.label]} {s.score:.2f}" if show_scores else names[s.label]
        l, t, r, b = draw.textbbox((0, 0), text, font=fnt)
        box = (r - l + 2 * pad, b - t + 2 * pad)
        if int(s.mask.sum()) < 2 * box[0] * box[1]:  # the label would hide it, or sit on its neighbour
            continue  # the legend still lists the class
        x, y, depth = _anchor(s.mask)
        if depth < size / 3:  # too thin to carry a label readably
            continue
        rect = _place(box, (x, y), canvas.size, taken, pad)
        taken.append(rect)
        draw.rectangle(rect, fill=tuple(int(c * 0.45) for c in colours[i]))
        draw.text((rect[0] + pad - l, rect[1] + pad - t), text, font=fnt, fill=(255, 255, 255))
    return np.asarray(canvas)


def _legend(draw: ImageDraw.ImageDraw, segments: list[Segment], colours: list, names: list[str], size: int,
            hidden: int, min_score: Optional[float]) -> Rect:
    """Classes drawn (by total area, largest first) with their colour and count, in the top-right corner;
    returns the box it covers."""
    area: dict[int, int] = {}
    count: dict[int, int] = {}
    first: dict[int, int] = {}
    for i, s in enumerate(segments):
        area[s.label] = area.get(s.label, 0) + int(s.mask.sum())
        count[s.label] = count.get(s.label, 0) + 1
        first.setdefault(s.label, i)
    labels = sorted(area, key=lambda c: -area[c])
    lines = [(colours[first[c]], names[c] + (f" x{count[c]}" if count[c] > 1 else "")) for c in labels]
    if not segments:
        lines.append((None, "no segment predicted"))
    if hidden:
        lines.append((None, f"{hidden} below score {min_score:g} not drawn"))
    fnt = font(size)
    W, H = draw.im.size
    pad, gap = max(2, size // 3), max(1, size // 4)
    row = size + gap
    fit = max(1, (H - 2 * pad) // row)
    if len(lines) > fit:
        lines = lines[:fit - 1] + [(None, f"+{len(lines) - fit + 1} more")]
    widths = [draw.textlength(t, font=fnt) + (size + gap if c is not None else 0) for c, t in lines]
    box_w = int(min(max(widths), W - 2 * pad)) + 2 * pad
    box_h = len(lines) * row - gap + 2 * pad
    x0 = W - box_w - pad
    box = (x0, pad, x0 + box_w, pad + box_h)
    draw.rectangle(box, fill=(20, 20, 20), outline=(255, 255, 255))
    y = 2 * pad
    for colour, text in lines:
        x = x0 + pad
        if colour is not None:
            draw.rectangle((x, y, x + size - 1, y + size - 1), fill=colour, outline=(255, 255, 255))
            x += size + gap
        l, t, _, b = draw.textbbox((0, 0), text, font=fnt)
        draw.text((x - l, y + (size - (b - t)) // 2 - t), text, font=fnt, fill=(255, 255, 255))
        y += row
    return box


def to_palette(image: np.ndarray, labels: list[int]) -> Image.Image:
    """An overlay as a 256-colour PNG image (``--palette``: about a third of the RGB file's size): an adaptive
    palette of the picture (PIL's FASTOCTREE, no dithering) plus the exact colours of ``labels``' classes, white
    and the legend's dark grey, so that the legend swatches and text keep their exact colours."""
    exact = list(dict.fromkeys([class_colour(c) for c in labels] + [(255, 255, 255), (20, 20, 20), (0, 0, 0)]))
    exact = exact[:128]  # a legend of more classes than that shares the adaptive colours
    picture = Image.fromarray(image)
    base = 256 - len(exact)
    adaptive = picture.quantize(base, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    colours = adaptive.getpalette()[:3 * base]
    colours += [0] * (3 * base - len(colours)) + [v for c in exact for v in c]
    palette = Image.new("P", (1, 1))
    palette.putpalette(colours)
    index = np.array(picture.quantize(palette=palette, dither=Image.Dither.NONE))
    for j, c in enumerate(exact):  # PIL's nearest-colour lookup is approximate: the exact colours by hand
        index[(image == np.asarray(c, np.uint8)).all(-1)] = base + j
    out = Image.fromarray(index.astype(np.uint8), "P")
    out.putpalette(colours)
    return out


def side_by_side(panels: list[np.ndarray], titles: list[str]) -> np.ndarray:
    """Overlays of one image by several models, left to right, each under a title bar naming its model."""
    h, w = panels[0].shape[:2]
    size = font_size((h, w))
    bar, gap = size * 2, max(2, size // 3)
    canvas = Image.new("RGB", (len(panels) * w + (len(panels) - 1) * gap, h + bar), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    fnt = font(size)
    for k, (panel, title) in enumerate(zip(panels, titles)):
        x = k * (w + gap)
        canvas.paste(Image.fromarray(panel), (x, bar))
        text = title
        while len(text) > 1 and draw.textlength(text + "...", font=fnt) > w - 2 * gap:
            text = text[:-1]
        if text != title:
            text += "..."
        draw.text((x + gap, (bar - size) // 2), text, font=fnt, fill=(0, 0, 0))
    return np.asarray(canvas)
