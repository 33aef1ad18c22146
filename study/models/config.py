"""Model section of the configuration (see study/models/build.py for how it becomes a model)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Optional

# ViT sizes: S, B, L, g (DINOv2 with registers), or "tiny" (a 4-block, 64-wide ViT for tests and demos); the
# widths and depths are in study/models/backbone.py.
SizeName = Literal["tiny", "S", "B", "L", "g"]


class Masking(NamedTuple):
    """How a model uses masked attention: in training, at inference, and whether training anneals it away."""

    attention: bool  # masked attention in training (and every intermediate prediction set supervised)
    inference: bool  # masked attention kept at inference
    annealing: Optional[bool]  # P_mask annealed 1 -> 0 in training; None: the trainer's rule (study/train/config.py)


# ``model.mask_setting``: the training settings of Table 7 (EoMT-L) and Table C (EoMT-L and ViT-Adapter-L + M2F),
# docs/paper.md section 4, named once so that every variant (EoMT and Table 1 rows 0-3) accepts them. The
# comment names the row it reproduces, labelled as in docs/tables.md and study/paper_numbers.csv
# ("masking in training / masking at inference").
MaskSettingName = Literal["masked", "masked_train_only", "unmasked", "annealed"]
MASK_SETTINGS: dict[str, Masking] = {
    # Table 7 and Table C "Masking / Masking": masked in training and at inference, P_mask = 1 throughout
    # (EoMT: Table 1 row 4, eomt_masked; ViT-Adapter + M2F: Mask2Former as published, rows 0-3's default).
    "masked": Masking(attention=True, inference=True, annealing=False),
    # Table 7 "Masking / w/o Masking": masked in training without annealing, masking removed at inference.
    "masked_train_only": Masking(attention=True, inference=False, annealing=False),
    # Table 7 and Table C "w/o Masking / w/o Masking": never masked. No intermediate prediction sets are made,
    # so none is supervised: the loss sees the final set only.
    "unmasked": Masking(attention=False, inference=False, annealing=False),
    # Table 7 and Table C "Mask annealing / w/o Masking": masked, P_mask annealed to 0 during training (the
    # sixths rule, study/train/schedules.py), no masking at inference (EoMT: Table 1 row 5, eomt).
    "annealed": Masking(attention=True, inference=False, annealing=True),
}


def mask_setting_name(m: Masking) -> Optional[str]:
    """The name of a resolved :class:`Masking` (annealing True/False, never None), or None if it has none."""
    if not m.attention:
        return "unmasked"
    for name, s in MASK_SETTINGS.items():
        if s == m:
            return name
    return None


# ---- the one mask-setting resolver (issue 25 item 3): the model builder, the trainer's annealing
# (study/train/schedules.py), the paper-row matching (study/paper_numbers.py) and the config check at load time
# (study/config.py, so that --dry-run refuses a clash) all resolve the setting here.

def model_masking(mask_setting: Optional[str], masked_attention: bool, masked_inference: Optional[bool],
                  variant_masks_at_inference: bool) -> Masking:
    """The model's part of the setting: ``mask_setting`` if given, else the two keys with the variant's default
    for masked inference (annealing then None: :func:`annealing_enabled` decides with ``train.mask_annealing``).
    Without masked attention in training nothing is masked at inference and nothing annealed."""
    if mask_setting is not None:
        return MASK_SETTINGS[mask_setting]
    if not masked_attention:
        return MASK_SETTINGS["unmasked"]
    inference = variant_masks_at_inference if masked_inference is None else masked_inference
    return Masking(True, inference, None)


def check_annealing_agrees(train_annealing: Optional[bool], model_annealing: Optional[bool]) -> None:
    """``train.mask_annealing`` (None = unset) against what the model's setting says (None = nothing)."""
    from study.errors import UserError

    if train_annealing is not None and model_annealing is not None and train_annealing != model_annealing:
        raise UserError(f"train.mask_annealing={str(train_annealing).lower()} contradicts model.mask_setting, "
                        f"which {'anneals' if model_annealing else 'does not anneal'} the masks; leave "
                        "train.mask_annealing unset (null)")


def annealing_enabled(model_annealing: Optional[bool], train_annealing: Optional[bool],
                      masked_inference: bool) -> bool:
    """Whether training anneals P_mask: the model's setting when it says, else ``train.mask_annealing``, else
    annealed exactly when masked attention is not kept at inference (study/train/config.py). A clash between
    the two keys is a UserError."""
    check_annealing_agrees(train_annealing, model_annealing)
    if model_annealing is not None:
        return model_annealing
    if train_annealing is not None:
        return train_annealing
    return not masked_inference


def resolve_masking(mask_setting: Optional[str], masked_attention: bool, masked_inference: Optional[bool],
                    variant_masks_at_inference: bool, train_annealing: Optional[bool]) -> Masking:
    """The whole setting, annealing resolved to True / False (a clash is a UserError)."""
    m = model_masking(mask_setting, masked_attention, masked_inference, variant_masks_at_inference)
    return m._replace(annealing=annealing_enabled(m.annealing, train_annealing, m.inference))


def check_masking(model: "ModelConfig", train_annealing: Optional[bool]) -> None:
    """The check at config load (study/config.py ``check_config``): a clash of ``train.mask_annealing`` with
    ``model.mask_setting`` (or with ``model.masked_attention: false``, which anneals nothing) is refused
    before anything runs, ``--dry-run`` included. The variant's default for masked inference cannot clash
    (it only decides when no key does), so any value serves here."""
    resolve_masking(model.mask_setting, model.masked_attention, model.masked_inference, True, train_annealing)


class TokenMerging(NamedTuple):
    """ALGM's settings, resolved for one ViT (study/models/algm.py applies them). Blocks are 0-based."""

    local_block: int  # the block whose output (between attention and MLP) gets the local 2x2-window merge
    global_block: Optional[int]  # the later block of the global bipartite merge; None = no global merge
    local_threshold: float  # a window merges when its mean pairwise cosine similarity is >= this
    global_threshold: Optional[float]  # None = ALGM's adaptive threshold; a number fixes it (> 1: no merge)
    window: int  # the local window's side


# ALGM's published settings per ViT size (Norouzi et al., CVPR 2024, tue-mps/algm-segmenter TRAINING.md, the
# Segmenter + ALGM ADE20K commands; "--selected-layers" there is 1-based, here 0-based; the window is 2x2 in
# every command). The EoMT paper (docs/paper.md section 4, Table 9) does not say which setting it used for
# EoMT-L on Cityscapes; ALGM publishes no ViT-L Cityscapes setting, so L takes its ADE20K one.
#   size: (local block, global block, local threshold)
ALGM_DEFAULTS: dict[str, tuple[int, int, float]] = {
    "S": (0, 4, 0.88),  # "--selected-layers 1 5 --threshold 0.88" (ViT-S, ADE20K)
    "B": (0, 4, 0.94),  # "--selected-layers 1 5 --threshold 0.94" (ViT-B, ADE20K)
    "L": (0, 6, 0.95),  # "--selected-layers 1 7 --threshold 0.95" (ViT-L, ADE20K)
    # Our choices, not ALGM's: g has no published setting (L's is taken); the 4-block tiny ViT merges in its
    # first two blocks (its queries join at block 2) with ALGM's ViT-Ti threshold ("--threshold 0.9").
    "g": (0, 6, 0.95),
    "tiny": (0, 1, 0.9),
}


@dataclass
class TokenMergingConfig:
    """``model.token_merging``: ALGM token merging in EoMT's forward at inference (Table 9; never in training)."""

    enabled: bool = False
    # 0-based blocks of the local and the global merge; None takes ALGM's default for model.size (ALGM_DEFAULTS).
    local_block: Optional[int] = None
    global_block: Optional[int] = None
    global_merge: bool = True  # false: the local merge only
    # The local merge's cosine-similarity threshold; None: ALGM's default for the size. Above 1 nothing merges.
    threshold: Optional[float] = None
    # The global merge's threshold; None: ALGM's adaptive one (mean + std / layer of the tokens' best-match
    # similarity; study/models/algm.py). A number fixes it instead (our option; above 1 nothing merges).
    global_threshold: Optional[float] = None
    window: int = 2  # the local window's side (ALGM: --merging-window-size 2 2)

    def validate(self) -> None:
        if self.window < 2:
            raise ValueError(f"window must be >= 2, got {self.window}")
        for name in ("local_block", "global_block"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"{name} must be >= 0 (or unset), got {v}")
        if self.local_block is not None and self.global_block is not None and self.global_block <= self.local_block:
            raise ValueError(f"global_block ({self.global_block}) must come after local_block ({self.local_block})")

    def resolve(self, size: str) -> Optional[TokenMerging]:
        """The settings for a ViT of ``size`` (None when merging is off)."""
        if not self.enabled:
            return None
        local, glob, threshold = ALGM_DEFAULTS[size]  # every size of study/models/backbone.py SIZES
        local = local if self.local_block is None else self.local_block
        glob = glob if self.global_block is None else self.global_block
        return TokenMerging(local, glob if self.global_merge else None,
                            threshold if self.threshold is None else self.threshold, self.global_threshold,
                            self.window)


# The variants whose model is EoMT (study/models/build.py): the only ones token merging applies to.


@dataclass
class ModelConfig:
    # A name from the variant registry (`study variants` lists them): eomt, eomt_masked, and the baseline
    # chain of Table 1 (vit_adapter_m2f, sfp_m2f, sfp_no_pixel_decoder, single_scale).
    variant: str = "eomt"
    # ViT size: S, B, L, g (DINOv2 with registers), or "tiny" (a 4-block, 64-wide ViT for tests and demos).
    size: SizeName = "L"
    # timm backbone name; None takes vit_{small,base,large,giant}_patch14_reg4_dinov2 for the size.
    # Table 2 backbones: eva02_large_patch14_224.mim.m38m, deit3_large_patch16_384.fb.in22k.ft.in1k, ...
    backbone: Optional[str] = None
    img_size: int = 640  # input size (square, padded); docs/paper.md section 6: COCO 640
    patch_size: int = 16  # docs/paper.md section 5: DINOv2 re-created with patch 16
    num_classes: int = 133  # COCO panoptic: 80 things + 53 stuff
    num_queries: int = 200  # K, docs/paper.md section 5: 200 panoptic / instance, 100 semantic
    # L2, blocks that see the queries; None takes the paper's 3/3/4/5 for S/B/L/g (docs/paper.md section 5).
    num_query_blocks: Optional[int] = None
    # The mask setting of Tables 7 and C by name (MASK_SETTINGS above: masked, masked_train_only, unmasked,
    # annealed); it decides masked_attention, masked_inference and the annealing together, for every variant.
    # None: those come from the two keys below and train.mask_annealing (the variant's own default).
    mask_setting: Optional[MaskSettingName] = None
    # Masked attention in training (False: one prediction set, no intermediate supervision; Table 7 "never
    # masked" is mask_setting: unmasked).
    masked_attention: bool = True
    # Keep masked attention on at inference (Table 1 row 4). None: the variant decides (eomt_masked: on).
    masked_inference: Optional[bool] = None
    pretrained: Optional[str] = None  # local backbone weights (DINOv2 original or timm layout); never downloaded
    checkpoint: Optional[str] = None  # a whole-model checkpoint: ours, official EoMT, or Hugging Face EoMT
    # The checkpoint holds differences to the pretrained backbone (the official DINOv3 configs' and released
    # EoMT-DINOv3 checkpoints' ``delta_weights: True``; zero is the base outside the encoder): loading adds them
    # to model.pretrained, which must then be given (study/models/dinov3.py).
    delta_weights: bool = False
    # Start from another run's weights: a weights file (any layout model.checkpoint takes) or a run folder (its
    # checkpoints/model_final.pt); Table 4's ADE20K runs start from their COCO runs. Unlike model.checkpoint it
    # keeps this model's masking probabilities (a new training anneals anew), and with reinit_class_head its
    # freshly initialised class head, so the new run may have other classes (COCO 133 -> ADE20K 150).
    init_from: Optional[str] = None
    reinit_class_head: bool = False
    drop_path: float = 0.0  # stochastic depth of the backbone; the paper is silent, the official configs use 0
    # Options of the baseline chain (ViT-Adapter, pyramid, pixel decoder, decoder): validated strictly when the
    # config is loaded, against the options the variant registered (baselines/config.py; see that file for the
    # keys). EoMT takes none.
    baseline: dict[str, Any] = field(default_factory=dict)
    # ALGM token merging at inference (Table 9): TokenMergingConfig above; model.token_merging.enabled=true turns
    # it on with ALGM's published setting for the size.
    token_merging: TokenMergingConfig = field(default_factory=TokenMergingConfig)

    def validate(self) -> None:
        # Messages start with the field at fault: study.config names its dotted key and source from that.
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        if self.img_size < self.patch_size:
            raise ValueError(f"img_size must be at least the patch size {self.patch_size}, got {self.img_size}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by the patch size {self.patch_size}")
        for name in ("num_queries", "num_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_query_blocks is not None and self.num_query_blocks < 1:
            raise ValueError(f"num_query_blocks must be >= 1 (or unset), got {self.num_query_blocks}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}")
        if self.delta_weights and not (self.checkpoint or self.init_from):
            raise ValueError("delta_weights is true but model.checkpoint (or model.init_from) is not set; delta weights describe a "
                             "checkpoint file")
        if self.init_from and self.checkpoint:
            raise ValueError("init_from and model.checkpoint are both set; give one: model.checkpoint is a whole "
                             "model, model.init_from the start of a new training")
        if self.reinit_class_head and not self.init_from:
            raise ValueError("reinit_class_head is true but model.init_from is not set")
        if self.mask_setting is not None:
            m = MASK_SETTINGS[self.mask_setting]
            if self.masked_inference is not None and self.masked_inference != m.inference:
                raise ValueError(f"mask_setting '{self.mask_setting}' has masked inference {m.inference} but "
                                 f"masked_inference is {self.masked_inference}; leave model.masked_inference unset")
            if not self.masked_attention and m.attention:
                raise ValueError(f"mask_setting '{self.mask_setting}' trains with masked attention but "
                                 "masked_attention is false; use mask_setting 'unmasked' or leave "
                                 "model.masked_attention unset")

    def masking(self, variant_masks_at_inference: bool) -> Masking:
        """The model's part of the setting (:func:`model_masking`; annealing None when the trainer's rule
        decides, study/train/schedules.py)."""
        return model_masking(self.mask_setting, self.masked_attention, self.masked_inference,
                             variant_masks_at_inference)
