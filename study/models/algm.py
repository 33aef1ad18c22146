"""ALGM token merging (Norouzi et al., CVPR 2024, "Adaptive Local-then-Global Token Merging") in EoMT's forward at
inference: Table 9 of the paper (docs/paper.md section 4). Written from the paper's description and the facts of
the original code (tue-mps/algm-segmenter, ``algm/local_merge.py``, ``algm/global_merge.py``,
``algm/patch/algm_segmenter_patch.py``); the code here is ours.

What is merged, and when (facts of the original code unless marked "ours"):
- Merging happens inside a block, between the attention (with its residual) and the MLP; the merge metric is
  the tokens themselves at that point.
- Local merge, at the first selected block: the patch grid is cut into non-overlapping 2x2 windows; a window
  whose mean pairwise cosine similarity (self-pairs left out) is at or above the threshold collapses into one
  token. Each image counts its windows above the threshold; the smallest count over the batch, r, is merged in
  every image (its r most similar windows), so the batch keeps one shape. Ours: a grid side that is not a
  multiple of the window leaves its last row / column of patches out of every window (ALGM asserts it is).
- Global merge, at a later block: ToMe's bipartite matching. The tokens alternate between set A (even
  positions) and set B (odd); each A token's best match in B by cosine similarity is its score. ALGM's
  adaptive threshold is ``mean + std / i`` with ``i`` the block's 1-based number, the mean and the (unbiased)
  std taken per image over A's scores and then averaged over the batch; each image counts its A tokens at or
  above it, the batch minimum r is merged: each image's r best A tokens join their matches in B.
- Merged tokens are size-weighted averages (a token's size = the patches it holds), ALGM's ``merge_wavg``.
  ALGM passes the sizes to the attention but its attention does not use them (no proportional attention); the
  same here.
- The prefix tokens (CLS + registers) are never merged (ALGM protects its CLS token the same way); EoMT's
  queries join after both merges (the merge blocks must come before the query blocks) and are never merged.
- Unmerging (ours, the head needs the grid): every patch of the grid takes the value of the token that holds it,
  before the upscaler and the mask head, at every prediction (intermediate and final).
- Masked inference (Table 1 row 4, ours): the mask logits of each query are predicted on the unmerged grid as
  usual, averaged over each merged token's patches, and the attention mask opens where that average is > 0.

Tokens keep their grid order through both merges (a merged group sits at its first member's place); with
nothing merged the tokens go on untouched, so every tensor is the plain forward's, bit for bit
(tests/test_algm.py).

Host syncs: the batch minimum r sets the number of tokens, so each merge reads one integer back from the device
(two per forward). The plain EoMT forward reads none (tests/test_host_syncs.py, tests/test_algm.py).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn
from torch.nn import functional as F

from study.errors import UserError
from study.models.config import TokenMerging


class MergeState(NamedTuple):
    """Where each patch of the grid went after the merges so far."""

    assign: torch.Tensor  # (B, P) long: the index, among the current patch tokens, of the token holding patch p
    size: torch.Tensor  # (B, T, 1): how many patches each current patch token holds


def initial_state(batch: int, num_patches: int, device, dtype) -> MergeState:
    assign = torch.arange(num_patches, device=device).expand(batch, -1)
    return MergeState(assign, torch.ones(batch, num_patches, 1, device=device, dtype=dtype))


def window_members(grid: tuple[int, int], window: int, device) -> torch.Tensor:
    """(num windows, window^2) flat patch indices of the non-overlapping windows, row-major, members row-major
    inside each window (the first member is the window's top-left patch). Patches beyond the last whole window
    of a row or column are in none."""
    h, w = grid
    gh, gw = h // window, w // window
    idx = torch.arange(h * w, device=device).view(h, w)[: gh * window, : gw * window]
    return idx.view(gh, window, gw, window).permute(0, 2, 1, 3).reshape(gh * gw, window * window)


def window_similarity(patches: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity of each window's tokens, self-pairs left out: (B, P, D) -> (B, W)."""
    n = members.shape[1]
    x = F.normalize(patches.float(), dim=-1)[:, members]  # (B, W, n, D)
    gram = x @ x.transpose(-1, -2)  # (B, W, n, n)
    return (gram.sum((-1, -2)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)) / (n * (n - 1))


def local_targets(patches: torch.Tensor, grid: tuple[int, int], threshold: float, window: int) -> tuple[torch.Tensor, int]:
    """The local merge: for each patch token its representative (itself, or its window's top-left token), and the
    number of tokens removed. ``patches`` must still be the whole grid (the local merge comes first)."""
    b, t, _ = patches.shape
    members = window_members(grid, window, patches.device)
    rep = torch.arange(t, device=patches.device).expand(b, -1).clone()
    if members.shape[0] == 0:
        return rep, 0
    sim = window_similarity(patches, members)  # (B, W)
    r = int((sim >= threshold).sum(1).min())  # the batch minimum: one host sync
    if r == 0:
        return rep, 0
    top = sim.topk(r, dim=1).indices  # (B, r) the r most similar windows of each image
    chosen = members[top]  # (B, r, n)
    rep.scatter_(1, chosen.flatten(1), chosen[..., :1].expand_as(chosen).flatten(1))
    return rep, r * (window * window - 1)


def global_targets(patches: torch.Tensor, layer_number: int, threshold: Optional[float]) -> tuple[torch.Tensor, int]:
    """The global bipartite merge: for each patch token its representative (itself, or the B token its A token
    joins) and the number of tokens removed. ``threshold`` None = ALGM's adaptive one at 1-based block
    ``layer_number``."""
    b, t, _ = patches.shape
    rep = torch.arange(t, device=patches.device).expand(b, -1).clone()
    if t < 2:
        return rep, 0
    x = F.normalize(patches.float(), dim=-1)
    a, bb = x[:, ::2], x[:, 1::2]
    best, match = (a @ bb.transpose(-1, -2)).max(dim=-1)  # (B, Ta): each A token's best B token
    if threshold is None:
        # ALGM's adaptive threshold: per-image mean and unbiased std of the best-match scores, each averaged over
        # the batch, mean + std / i (i = the 1-based block number).
        spread = best.std(dim=1).mean() if best.shape[1] > 1 else best.new_zeros(())
        thr = best.mean(dim=1).mean() + spread / layer_number
        above = best >= thr
    else:
        above = best >= threshold
    r = int(above.sum(1).min())  # the batch minimum: one host sync
    if r == 0:
        return rep, 0
    src = best.argsort(dim=1, descending=True)[:, :r]  # (B, r) indices into A
    dst = match.gather(1, src)  # their B tokens
    rep.scatter_(1, 2 * src, 2 * dst + 1)
    return rep, r


def apply_targets(patches: torch.Tensor, state: MergeState, rep: torch.Tensor, removed: int
                  ) -> tuple[torch.Tensor, MergeState]:
    """Merge each token into its representative (``rep[rep] == rep``): size-weighted averages, grid order kept."""
    b, t, d = patches.shape
    new_index = torch.cumsum(rep == torch.arange(t, device=rep.device), dim=1) - 1  # of each representative
    to = new_index.gather(1, rep)  # (B, T): each token's new index
    n = t - removed
    size = state.size.new_zeros(b, n, 1).scatter_add_(1, to[..., None], state.size)
    summed = patches.new_zeros(b, n, d).scatter_add_(1, to[..., None].expand(-1, -1, d),
                                                     patches * state.size.to(patches.dtype))
    merged = summed / size.to(patches.dtype)
    return merged, MergeState(to.gather(1, state.assign), size)


def unmerge(patches: torch.Tensor, state: Optional[MergeState]) -> torch.Tensor:
    """Merged patch tokens (B, T, D) back to the grid (B, P, D): each patch takes its token's value."""
    if state is None:
        return patches
    return patches.gather(1, state.assign[..., None].expand(-1, -1, patches.shape[-1]))


def pool_to_tokens(grid_values: torch.Tensor, state: MergeState) -> torch.Tensor:
    """Per-patch values (B, Q, P) -> their mean over each merged token's patches (B, Q, T)."""
    b, q, _ = grid_values.shape
    t = state.size.shape[1]
    summed = grid_values.new_zeros(b, q, t).scatter_add_(2, state.assign[:, None].expand(-1, q, -1), grid_values)
    return summed / state.size.transpose(1, 2).to(grid_values.dtype)


def check_block(block: nn.Module, where: str) -> None:
    """The merge runs between a block's attention and its MLP: the block must have timm's ``Block`` layout."""
    for name in ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"):
        if not hasattr(block, name):
            raise UserError(f"model.token_merging: {where} ({type(block).__name__}) has no '{name}'; token merging "
                            "needs timm's Block layout (DINOv2, DeiT III backbones)")


def merging_block(block: nn.Module, x: torch.Tensor, num_prefix: int, state: MergeState, merge
                  ) -> tuple[torch.Tensor, MergeState]:
    """One ViT block with a merge between its attention and its MLP (ALGM's TurboBlock). ``merge(patches)``
    returns (representatives, tokens removed). The same operations as timm's ``Block.forward`` around it."""
    x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
    prefix, patches = x[:, :num_prefix], x[:, num_prefix:]
    rep, removed = merge(patches)
    if removed:  # nothing to merge (r = 0): the tokens go on as they are
        patches, state = apply_targets(patches, state, rep, removed)
        x = torch.cat([prefix, patches], dim=1)
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, state


def check_settings(settings: TokenMerging, depth: int, first_query_block: int, is_rope: bool, blocks) -> None:
    """Token-merging settings that fit the model (one UserError naming the key otherwise)."""
    if is_rope:
        raise UserError("model.token_merging: the backbone uses rotary position embeddings (EVA-02, DINOv3), whose "
                        "per-patch rotations cannot follow merged tokens; use a DINOv2 or DeiT III backbone")
    last = first_query_block - 1
    for key, block in (("local_block", settings.local_block), ("global_block", settings.global_block)):
        if block is None:
            continue
        if not 0 <= block <= last:
            raise UserError(f"model.token_merging.{key} is {block}; merging must happen before the queries join at "
                            f"block {first_query_block} of {depth} (0-based): choose 0..{last}")
        check_block(blocks[block], f"block {block}")
    if settings.global_block is not None and settings.global_block <= settings.local_block:
        raise UserError(f"model.token_merging.global_block ({settings.global_block}) must come after local_block "
                        f"({settings.local_block})")
