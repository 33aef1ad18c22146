"""A study suite for encoder-only image segmentation (EoMT) and the ViT-Adapter + Mask2Former chain."""
import warnings

__version__ = "0.1.0"

# fvcore (the FLOP reference) decorates its focal losses with torch.jit.script when fvcore.nn is imported, and
# current torch warns that jit.script is deprecated: a line on every count that concerns neither the user nor
# the count. Only that warning, raised from that decorator, is hidden.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning,
                        module=r"torch\.jit\._script")
