"""The baseline chain of Table 1: ViT-Adapter + Mask2Former (row 0) and the three steps towards EoMT (rows 1-3).

Read in the order of the figure: deform_attn.py (multi-scale deformable attention) -> vit_adapter.py (row 0's
neck) / pyramid.py (rows 1-3) -> pixel_decoder.py (rows 0-1; projections in rows 2-3) -> m2f_decoder.py (the
masked-attention Transformer decoder) -> model.py (the contract) -> variants.py (the rows as a table of small
differences; register_variants is the ``study.variants`` entry point that puts rows 0-3 in study's registry). config.py holds the options
(``model.baseline``), hf.py the key maps to Hugging Face's Mask2Former, bench_speed.py the side-by-side timing.
Depends on study/, never the other way round.
"""
