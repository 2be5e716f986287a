"""CONDITIONING as the whole thing a model reads: hidden states, pooled output and (SDXL) the size entries.

SDXL's vector conditioning is built from the pooled CLIP-G output plus ``width``, ``height``, ``crop_w``,
``crop_h``, ``target_width`` and ``target_height`` (CLIPTextEncodeSDXL); a model missing them falls back to 768 px
and conditions differently. So wherever the pack encodes a prompt again or checks that two conditionings match,
it carries and compares these entries too, not only the hidden states.
"""
from __future__ import annotations

from typing import Optional

import torch

from .artifacts import digest, user_text

# the entries SDXL's encode_adm reads besides the pooled output (scalars; harmless on SD1.x/SD2)
SIZE_KEYS = ("width", "height", "crop_w", "crop_h", "target_width", "target_height")


def size_entries(conditioning) -> dict:
    """The size/crop entries of a CONDITIONING's first entry ({} when it has none, e.g. SD1.x)."""
    if not conditioning:
        return {}
    meta = conditioning[0][1]
    return {k: meta[k] for k in SIZE_KEYS if k in meta}


def size_entries_for_latent(latent_shape) -> dict:
    """What CLIPTextEncodeSDXL would be given for a generated image of this latent's size (8 px per latent px)."""
    h, w = int(latent_shape[-2]) * 8, int(latent_shape[-1]) * 8
    return {"width": w, "height": h, "crop_w": 0, "crop_h": 0, "target_width": w, "target_height": h}


def first_row(conditioning) -> list:
    """Row 0 of every entry, with the pooled output sliced the same way and every other entry kept."""
    out = []
    for cond, meta in conditioning:
        meta = dict(meta)
        if torch.is_tensor(meta.get("pooled_output")):
            meta["pooled_output"] = meta["pooled_output"][:1]
        out.append([cond[:1], meta])
    return out


def fingerprint(conditioning) -> str:
    """A content digest of everything a model reads from a CONDITIONING: every entry's hidden states, pooled output
    and other entries (tensors by value, scalars by repr, objects other packs attach by class and state), each item
    length-delimited, in order."""
    return digest("conditioning", [[cond, dict(meta)] for cond, meta in (conditioning or [])])[:32]


def mismatch(a, b, atol: float = 1e-4, pooled_matters: bool = True) -> Optional[str]:
    """None if the first entries of two CONDITIONINGs condition a model the same way, else what differs.
    ``pooled_matters``: the model reads the pooled output (a vector/ADM input, e.g. SDXL); SD1.x/SD2.x ignore it."""
    ca, cb = a[0][0], b[0][0]
    if ca.shape != cb.shape or not torch.allclose(ca.float().cpu(), cb.float().cpu(), atol=atol):
        return "the prompt embeddings differ"
    pa, pb = a[0][1].get("pooled_output"), b[0][1].get("pooled_output")
    if pooled_matters and ((pa is None) != (pb is None) or (pa is not None and (
            pa.shape != pb.shape or not torch.allclose(pa.float().cpu(), pb.float().cpu(), atol=atol)))):
        return "the pooled outputs differ"
    sa, sb = size_entries(a), size_entries(b)
    if sa != sb:
        return f"the size entries differ ({user_text(sa)} vs {user_text(sb)})"
    return None
