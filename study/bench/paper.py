"""The paper's published parameter (millions), GFLOPs, FPS and PQ columns, as targets to print next to ours.

Key: (variant, size, img_size) -> (params in M, GFLOPs, FPS on an H100); ``PAPER_PQ`` holds the PQ column.
Sources: docs/paper.md section 2 (Table 1, ViT-L at 640), section 3 (Table 3, sizes, and the 1280 results).
"""
from __future__ import annotations

PAPER: dict[tuple[str, str, int], tuple[float, float, float]] = {
    # Table 1 (ViT-L, 640)
    ("vit_adapter_m2f", "L", 640): (349, 830, 29),
    ("sfp_m2f", "L", 640): (342, 700, 36),
    ("sfp_no_pixel_decoder", "L", 640): (337, 685, 61),
    ("single_scale", "L", 640): (328, 673, 64),
    ("eomt_masked", "L", 640): (316, 828, 61),
    ("eomt", "L", 640): (316, 669, 128),
    # Table 3 (640)
    ("vit_adapter_m2f", "g", 640): (1209, 2510, 20),
    ("eomt_masked", "g", 640): (1164, 2689, 35),
    ("eomt", "g", 640): (1164, 2261, 55),
    ("vit_adapter_m2f", "B", 640): (121, 347, 32),
    ("eomt_masked", "B", 640): (93, 286, 104),
    ("eomt", "B", 640): (93, 216, 261),
    ("vit_adapter_m2f", "S", 640): (47, 165, 33),
    ("eomt_masked", "S", 640): (24, 89, 108),
    ("eomt", "S", 640): (24, 68, 330),
    # Higher resolution (1280)
    ("eomt", "L", 1280): (322, 4146, 30),
    ("eomt", "g", 1280): (1171, 12712, 12),
    ("vit_adapter_m2f", "L", 1280): (354, 4817, 10),
    ("vit_adapter_m2f", "g", 1280): (1216, 13790, 6),
}


# PQ on COCO val2017 panoptic (docs/paper.md sections 2 and 3): Table 1 rows at L 640, Table 3 sizes, the 1280 row.
PAPER_PQ: dict[tuple[str, str, int], float] = {
    ("vit_adapter_m2f", "L", 640): 57.1, ("sfp_m2f", "L", 640): 56.7, ("sfp_no_pixel_decoder", "L", 640): 56.9,
    ("single_scale", "L", 640): 56.7, ("eomt_masked", "L", 640): 56.2, ("eomt", "L", 640): 56.0,
    ("vit_adapter_m2f", "g", 640): 57.7, ("eomt_masked", "g", 640): 57.2, ("eomt", "g", 640): 57.0,
    ("vit_adapter_m2f", "B", 640): 54.4, ("eomt_masked", "B", 640): 51.5, ("eomt", "B", 640): 50.6,
    ("vit_adapter_m2f", "S", 640): 50.5, ("eomt_masked", "S", 640): 46.1, ("eomt", "S", 640): 44.7,
    ("eomt", "L", 1280): 58.3, ("eomt", "g", 1280): 59.2,
    ("vit_adapter_m2f", "L", 1280): 59.7, ("vit_adapter_m2f", "g", 1280): 59.9,
}


def paper_numbers(variant: str, size: str, img_size: int) -> tuple[float, float, float] | None:
    return PAPER.get((variant, size, img_size))
