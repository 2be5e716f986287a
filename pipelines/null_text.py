"""Null-Text Inversion's assembly: the chosen method (null-text optimisation or negative-prompt inversion) on one
image's cfg-1 inversion, logged. The Null-Text Inversion node calls ``null_text_inversion``."""
from __future__ import annotations

from ..artifacts import NullText
from ..logs import log
from ..optimize import null_text


def null_text_inversion(model, inversion, positive, negative, cfg: float = 7.5, inner_steps: int = 10,
                        method: str = "null-text", learning_rate: float = null_text.LEARNING_RATE) -> NullText:
    if method == "negative-prompt":
        result = null_text.negative_prompt_inversion(model, inversion, positive, cfg)
    else:
        result = null_text.optimize(model, inversion, positive, negative, cfg, inner_steps, learning_rate)
    log.info("[Inversion Chain] %s", result.summary())
    return result


def null_text_conditioning(model, result: NullText) -> list:
    """The Null-Text Conditioning node: the NULL_TEXT as a stock sampler's negative (``null_text.as_conditioning``)."""
    return null_text.as_conditioning(model, result)
