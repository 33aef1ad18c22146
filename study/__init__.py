"""A study suite for encoder-only image segmentation (EoMT) and the ViT-Adapter + Mask2Former chain."""
__version__ = "0.1.0"
