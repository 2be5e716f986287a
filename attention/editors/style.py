"""StyleDiffusion on the attention core: the value input of cross-attention from a STYLE (keys keep the prompt),
and a differentiable recorder of cross-attention maps for the mapper's attention loss."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ...artifacts import named_error, node_name
from ..core.context import COND, ContextPatch, RowMap
from ..core.controller import CallContext, Editor
from ..core.layers import AttentionLayer
from .local_blend import BLEND_LEVEL
from ..core.schedule import Schedule


def joint_attention_has_no_value_input(family: str) -> str:
    """Why StyleDiffusion has no place on a rectified-flow DiT (Flux, Chroma, Qwen-Image, SD3.5's MMDiT), for the
    refusal of every node that would inject a STYLE there (the caller's error; no node name)."""
    return (f"the model family '{family}' is a rectified-flow DiT with joint attention: its text tokens are a stream "
            f"that every block updates and projects to queries, keys and values from one hidden state, so there is "
            f"no cross-attention value input that is the prompt embedding. StyleDiffusion replaces exactly that "
            f"input with a mapping learned from the image while the keys keep the prompt; on a DiT, changing the "
            f"text tokens' values changes what the text stream carries into every later block, keys included. "
            f"StyleDiffusion runs on the UNet families with cross-attention (SD1.x, SD2.x, SDXL); on this model use "
            f"DDIM Invert with KV Inject, RIVAL or P2Plus (see README.md's Features table for which family runs "
            f"what).")


def value_injection(values: Optional[torch.Tensor], schedule: Schedule, end_percent: float = 1.0,
                    row_maps: Sequence[RowMap] = ()) -> ContextPatch:
    """StyleDiffusion's value input: in the conditional rows, the STYLE's embedding of the step becomes the value
    input of every cross-attention while ``step / N < end_percent``; keys keep the prompt. ``values`` None: only
    the training ``override`` acts."""
    return ContextPatch(values, schedule, COND, keys=False, end_percent=end_percent, row_maps=row_maps,
                        mismatch="Use a source prompt of the same length (and the same model) as the STYLE's.")


class CrossAttentionRecorder(Editor):
    """Observer: keeps the conditional rows' cross-attention probabilities (mean over heads, ``(rows, Nq, Nk)``)
    of the layers at one resolution, in call order, with autograd intact (the attention loss backpropagates
    through them). Only records while ``enabled``."""

    order = 90
    kinds = ("cross",)

    def __init__(self, level: int, schedule: torch.Tensor):
        self.level = int(level)
        self.node = node_name()
        self._schedule = schedule
        self.enabled = False
        self.maps: List[torch.Tensor] = []

    def schedule(self):
        return self._schedule

    def layers(self, all_layers: Sequence[AttentionLayer]) -> Sequence[AttentionLayer]:
        level = min(self.level, max(l.level for l in all_layers))
        return [l for l in all_layers if l.level == level]

    def active(self, ctx: CallContext) -> bool:
        return self.enabled and ctx.kind == "cross" and bool(ctx.chunk_rows(0))

    def needs_probs(self, ctx: CallContext) -> bool:
        return True

    def edit_probs(self, probs, ctx):
        self.maps.append(probs[ctx.chunk_rows(0)].mean(dim=1))
        return probs

    def take(self) -> torch.Tensor:
        """The maps recorded since the last take, stacked: (layers, rows, Nq, Nk)."""
        if not self.maps:
            raise named_error(f"{self.node}: no cross-attention maps were recorded (the model has no "
                                      f"cross-attention layers at latent/4).")
        out = torch.stack(self.maps)
        self.maps = []
        return out


def recorder_level() -> int:
    """Cross-attention maps at latent/4 (16x16 at 512 px), the resolution StyleDiffusion's loss uses."""
    return BLEND_LEVEL
