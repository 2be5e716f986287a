"""One input contract for every node, read from the node's own INPUT_TYPES.

ComfyUI converts and range-checks only required widgets reached through required links; optional inputs (and whole
nodes reached only through an optional link) arrive as the client sent them, and NaN passes every min/max. The
``checked`` decorator coerces and validates every input that arrived (required and optional) against its declared
spec before the node function runs, and raises one clear error naming the node, the input, what arrived and what
is accepted. It also runs the node function under ``naming``: every InversionChainError raised inside (by the node,
its pipeline or anything below) gets the node's display name in front, so the layers below never take a name.
"""
from __future__ import annotations

import functools
import inspect
import math

import torch

from ..artifacts import Inversion, InversionChainError, NullText, Style, naming, user_text

# Text widgets size work (prompts, word lists, layer specs): longer text is refused rather than tokenised or echoed.
MAX_TEXT = 1000
MAX_MULTILINE_TEXT = 8000
REPR_CHARS = 80

_DISPLAY = {}  # node class -> display name, filled by register()


def register(class_mappings: dict, display_mappings: dict):
    """Let error messages use each node's display name."""
    for key, cls in class_mappings.items():
        _DISPLAY[cls] = display_mappings.get(key, key)


def display_name(cls) -> str:
    return _DISPLAY.get(cls, cls.__name__)


def short(value, limit: int = REPR_CHARS) -> str:
    """repr of ``value`` cut to ``limit`` characters (what arrived, without echoing huge inputs), HTML-escaped."""
    try:
        if torch.is_tensor(value):
            text = f"tensor of shape {tuple(value.shape)} ({value.dtype})"
        else:
            text = repr(value)
    except Exception:  # a broken __repr__ must not hide the real error
        text = f"<{type(value).__name__}>"
    if len(text) > limit:
        suffix = f" ({len(value)} characters)" if isinstance(value, str) else ""
        text = text[:limit - 3] + "..." + suffix
    return user_text(text)


# -- wired (non-widget) types: a predicate and what is accepted ---------------------------------------------------
def _is_tensor(ndims):
    return lambda v: torch.is_tensor(v) and v.ndim in ndims


def _is_image_latent(t) -> bool:
    """[B, C, H, W], or [B, C, 1, H, W]: what VAE Encode gives for models with a video VAE (Qwen-Image, Wan 2.1)."""
    return t.ndim == 4 or (t.ndim == 5 and t.shape[2] == 1)


def _is_conditioning(v):
    return (isinstance(v, list) and len(v) > 0 and all(isinstance(c, (list, tuple)) and len(c) >= 2
                                                       and torch.is_tensor(c[0]) and isinstance(c[1], dict)
                                                       for c in v))


def _is_attn_maps(v):
    from ..attention.viewer.capture import AttentionMaps
    return isinstance(v, AttentionMaps)


WIRED = {
    "MODEL": (lambda v: hasattr(v, "model") and hasattr(v, "model_options") and hasattr(v, "clone"),
              "a MODEL (e.g. from Load Checkpoint)"),
    "CLIP": (lambda v: hasattr(v, "tokenize") and hasattr(v, "encode_from_tokens"),
             "a CLIP (e.g. from Load Checkpoint)"),
    "CLIP_VISION": (lambda v: hasattr(v, "encode_image"), "a CLIP_VISION from Load CLIP Vision"),
    "CONDITIONING": (_is_conditioning, "a CONDITIONING (e.g. from CLIP Text Encode)"),
    "LATENT": (lambda v: isinstance(v, dict) and torch.is_tensor(v.get("samples")) and _is_image_latent(v["samples"]),
               "a LATENT: a dict whose 'samples' is a [B, C, H, W] tensor (e.g. from VAE Encode or Empty Latent "
               "Image), or [B, C, 1, H, W] (one frame of a video-VAE latent: Qwen-Image's VAE Encode)"),
    "IMAGE": (lambda v: torch.is_tensor(v) and v.ndim == 4 and v.shape[-1] == 3 and v.shape[0] > 0,
              "an IMAGE: a [B, H, W, 3] tensor (e.g. from Load Image or VAE Decode)"),
    "MASK": (_is_tensor((2, 3)), "a MASK: a [H, W] or [B, H, W] tensor"),
    "SIGMAS": (_is_tensor((1,)), "SIGMAS: a 1-D tensor (e.g. from BasicScheduler)"),
    "INVERSION": (lambda v: isinstance(v, Inversion), "an INVERSION from DDIM Invert"),
    "NULL_TEXT": (lambda v: isinstance(v, NullText), "a NULL_TEXT from Null-Text Inversion"),
    "STYLE": (lambda v: isinstance(v, Style), "a STYLE from StyleDiffusion Mapper"),
    "ATTN_MAPS": (_is_attn_maps, "ATTN_MAPS from Attention Capture"),
}


def _number_range(opts: dict, fmt) -> str:
    lo, hi = opts.get("min"), opts.get("max")
    if lo is not None and hi is not None:
        return f"from {fmt(lo)} to {fmt(hi)}"
    if lo is not None:
        return f"of at least {fmt(lo)}"
    if hi is not None:
        return f"of at most {fmt(hi)}"
    return "(any)"


def coerce(name: str, kind, opts: dict, value):
    """The value converted as ComfyUI converts widget values, or an InversionChainError saying what is accepted."""
    def fail(accepted: str):
        raise InversionChainError(f"input `{name}` got {short(value)}; accepted: {accepted}.")

    if isinstance(kind, (list, tuple)) or kind == "COMBO":
        choices = list(kind) if isinstance(kind, (list, tuple)) else list(opts.get("options", []))
        if isinstance(value, str) and value in choices:
            return value
        listing = ", ".join(repr(c) for c in choices[:20]) + (", ..." if len(choices) > 20 else "")
        fail(f"one of {listing}")
    if kind == "INT":
        accepted = f"a whole number {_number_range(opts, int)}"
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            fail(accepted)
        try:
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError
            out = int(value)  # ComfyUI: int(val) (strings of digits and floats truncate)
        except (TypeError, ValueError, OverflowError):
            fail(accepted)
        if ("min" in opts and out < opts["min"]) or ("max" in opts and out > opts["max"]):
            fail(accepted)
        return out
    if kind == "FLOAT":
        accepted = f"a finite number {_number_range(opts, lambda x: f'{x:g}')}"
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            fail(accepted)
        try:
            out = float(value)  # ComfyUI: float(val)
        except (TypeError, ValueError, OverflowError):
            fail(accepted)
        if not math.isfinite(out) or ("min" in opts and out < opts["min"]) or ("max" in opts and out > opts["max"]):
            fail(accepted)
        return out
    if kind == "BOOLEAN":
        if isinstance(value, bool):
            return value
        fail("true or false")
    if kind == "STRING":
        limit = MAX_MULTILINE_TEXT if opts.get("multiline") else MAX_TEXT
        accepted = f"text of at most {limit} characters"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # ComfyUI: str(val)
        if not isinstance(value, str) or len(value) > limit:
            fail(accepted)
        return value
    if kind in WIRED:
        ok, accepted = WIRED[kind]
        try:
            good = ok(value)
        except Exception:
            good = False
        if not good:
            fail(accepted)
        return value
    return value  # a type this contract does not know: the node checks it


def validate(cls, arguments: dict) -> dict:
    """``arguments`` (input name -> value, only those that arrived) checked against ``cls.INPUT_TYPES()``."""
    spec = cls.INPUT_TYPES()
    out = dict(arguments)
    with naming(display_name(cls)):
        for section in ("required", "optional"):
            for name, entry in (spec.get(section) or {}).items():
                if name not in arguments:
                    continue
                kind = entry[0]
                opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
                if arguments[name] is None and section == "optional":
                    continue  # an optional input left unconnected
                out[name] = coerce(name, kind, opts, arguments[name])
    return out


def checked(fn):
    """Decorate a node function: every input that arrived is validated against the class's INPUT_TYPES first, and
    the function runs under ``naming(display name)`` (errors from any layer below name the node)."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        given = {k: v for k, v in bound.arguments.items() if k != "self"}
        with naming(display_name(type(self))):
            bound.arguments.update(validate(type(self), given))
            return fn(*bound.args, **bound.kwargs)

    return wrapper
