"""Overlay PNGs: a prediction drawn over its image, and several models' side by side.

An overlay has the image's size. Each segment is tinted with its class's colour (one colour per class, the
same in every image and every model of a comparison; instances of a class in lighter and darker shades),
outlined, and labelled with its class name and score at the centre of its thickest part. A legend in a corner
lists the classes drawn. The choices of this file are ours (the paper shows no overlays): a tint of 55%, labels
left off segments too thin to hold them (they stay in the legend), and instance predictions drawn only from
``min_score`` up (the raw file keeps all of them).
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


def _text_box(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, fnt, fill, bg, pad: int,
              centre: bool = True) -> None:
    x, y = xy
    l, t, r, b = draw.textbbox((0, 0), text, font=fnt)
    w, h = r - l, b - t
    if centre:
        x, y = x - w // 2, y - h // 2
    W, H = draw.im.size
    x = min(max(pad, x), max(pad, W - w - pad))
    y = min(max(pad, y), max(pad, H - h - pad))
    draw.rectangle((x - pad, y - pad, x + w + pad, y + h + pad), fill=bg)
    draw.text((x - l, y - t), text, font=fnt, fill=fill)


def draw_overlay(image: np.ndarray, segments: list[Segment], names: list[str], min_score: Optional[float] = None,
                 show_scores: bool = True) -> np.ndarray:
    """``segments`` over ``image`` (uint8 (H, W, 3)): an image of the same size. ``names``: class names in
    contiguous order. ``min_score``: segments below it are not drawn (the legend says how many)."""
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
    for i in order:
        s = segments[i]
        x, y, depth = _anchor(s.mask)
        if depth < size / 3:  # too thin to carry a label readably; the legend still lists the class
            continue
        text = f"{names[s.label]} {s.score:.2f}" if show_scores else names[s.label]
        dark = tuple(int(c * 0.45) for c in colours[i])
        _text_box(draw, (x, y), text, fnt, (255, 255, 255), dark, max(1, size // 6))
    _legend(draw, segments, colours, names, size, hidden, min_score)
    return np.asarray(canvas)


def _legend(draw: ImageDraw.ImageDraw, segments: list[Segment], colours: list, names: list[str], size: int,
            hidden: int, min_score: Optional[float]) -> None:
    """Classes drawn (by total area, largest first) with their colour and count, in the top-right corner."""
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
    draw.rectangle((x0, pad, x0 + box_w, pad + box_h), fill=(20, 20, 20), outline=(255, 255, 255))
    y = 2 * pad
    for colour, text in lines:
        x = x0 + pad
        if colour is not None:
            draw.rectangle((x, y, x + size - 1, y + size - 1), fill=colour, outline=(255, 255, 255))
            x += size + gap
        l, t, _, b = draw.textbbox((0, 0), text, font=fnt)
        draw.text((x - l, y + (size - (b - t)) // 2 - t), text, font=fnt, fill=(255, 255, 255))
        y += row


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
