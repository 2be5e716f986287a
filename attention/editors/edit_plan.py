"""Prompt-to-Prompt's edit plan: how the target prompt's cross-attention columns are taken from the source's
(replace: same token positions; refine: target tokens aligned to the source's, new tokens keep their own maps;
reweight: chosen target tokens' maps scaled by c)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from ...artifacts import InversionChainError, user_text
from ..core.tokens import (T5_STREAM, TextStream, align_tokens, describe_tokens, prompt_tokens, token_count,
                           word_positions)

MODES = ("replace", "refine", "reweight")
REWEIGHT_RANGE = (-2.0, 2.0)


def parse_reweight(text: str) -> List[Tuple[str, float]]:
    """``"flowers:2.0, red car:-1"`` -> [("flowers", 2.0), ("red car", -1.0)]."""
    out = []
    for item in (text or "").replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        word, sep, value = item.rpartition(":")
        if not sep or not word.strip():
            raise InversionChainError(f"reweight entry '{user_text(item)}' must look like 'word:value', e.g. "
                                      f"'flowers:2.0' (values in [{REWEIGHT_RANGE[0]:g}, {REWEIGHT_RANGE[1]:g}]).")
        try:
            c = float(value)
        except ValueError:
            raise InversionChainError(f"reweight value '{user_text(value.strip())}' of "
                                      f"'{user_text(word.strip())}' is not a number.")
        if not REWEIGHT_RANGE[0] <= c <= REWEIGHT_RANGE[1]:
            raise InversionChainError(f"reweight value {c:g} for '{user_text(word.strip())}' is outside "
                                      f"[{REWEIGHT_RANGE[0]:g}, {REWEIGHT_RANGE[1]:g}].")
        out.append((word.strip(), c))
    return out


@dataclass
class EditPlan:
    """How the target's cross-attention columns are taken from the source's (all tensors have 77 entries)."""

    mode: str
    source_ids: List[int]
    target_ids: List[int]
    mapper: torch.Tensor                 # long: source column for each target column
    aligned: torch.Tensor                # float: 1 = take the source's column, 0 = keep the target's own
    equalizer: Optional[torch.Tensor]    # float scale per target column (reweight), None = no scaling
    reweight: List[Tuple[str, float]] = field(default_factory=list)
    words: Optional[int] = None          # T5 plans (DiTs): the target's prompt tokens; None: CLIP (count - 2)

    @property
    def word_swap(self) -> bool:
        """True when the target's maps are the source's unchanged (the q/k copy does it, no explicit maps)."""
        n = self.mapper.numel()
        return (self.equalizer is None and bool(self.aligned.eq(1).all())
                and torch.equal(self.mapper, torch.arange(n, dtype=self.mapper.dtype)))

    def describe(self) -> str:
        new = int((self.aligned == 0).sum())
        count = token_count(self.target_ids) - 2 if self.words is None else self.words
        out = f"{self.mode}: {count} target tokens, {new} new"
        if self.reweight:
            out += ", reweight " + ", ".join(f"{w}:{c:g}" for w, c in self.reweight)
        return out


def build_plan(clip, source_prompt: str, target_prompt: str, mode: str, reweight: str = "") -> EditPlan:
    if mode not in MODES:
        raise InversionChainError(f"unknown mode '{user_text(mode)}'; use one of {', '.join(MODES)}.")
    src = prompt_tokens(clip, source_prompt, "source prompt")
    tgt = prompt_tokens(clip, target_prompt, "target prompt")
    if len(src) != len(tgt):
        raise InversionChainError(f"the source and target prompts tokenize to different window sizes "
                                  f"({len(src)} vs {len(tgt)}).")
    n = len(tgt)
    weights = parse_reweight(reweight)
    if mode == "reweight" and not weights:
        raise InversionChainError(f"mode 'reweight' needs `reweight`, e.g. 'flowers:2.0' (a word of the "
                                  f"target prompt and a scale in [{REWEIGHT_RANGE[0]:g}, {REWEIGHT_RANGE[1]:g}]).")
    word_swap = mode == "replace" or (mode == "reweight" and token_count(src) == token_count(tgt))
    if word_swap and token_count(src) != token_count(tgt):
        raise InversionChainError(
            f"mode 'replace' swaps words token for token, but the source prompt has "
            f"{token_count(src) - 2} tokens ({describe_tokens(clip, src)}) and the target prompt "
            f"{token_count(tgt) - 2} ({describe_tokens(clip, tgt)}). Use mode 'refine' for prompts of different "
            f"lengths, or choose replacement words with the same number of tokens.")
    mapper, aligned = _alignment(src, tgt, n, word_swap)
    equalizer = _equalizer(weights, n, lambda word: word_positions(clip, tgt, word), target_prompt,
                           lambda: describe_tokens(clip, tgt))
    return EditPlan(mode=mode, source_ids=src, target_ids=tgt, mapper=mapper, aligned=aligned, equalizer=equalizer,
                    reweight=weights)


def _alignment(src, tgt, n: int, word_swap: bool):
    """(mapper, aligned): the target token each position takes its source map from, and whether it has one. A
    word swap maps position to position; otherwise the longest common subsequence aligns them (new tokens: 0)."""
    if word_swap:
        return torch.arange(n, dtype=torch.long), torch.ones(n)
    pairs = align_tokens(src, tgt)
    return (torch.tensor([p if p >= 0 else j for j, p in enumerate(pairs)], dtype=torch.long),
            torch.tensor([1.0 if p >= 0 else 0.0 for p in pairs]))


def _equalizer(weights, n: int, positions_of, target_prompt: str, readable_tokens, kind: str = "tokens"):
    """Per-token scales of the target's maps for `reweight` (None without weights); an absent word is an error
    listing the target's tokens."""
    if not weights:
        return None
    equalizer = torch.ones(n)
    for word, c in weights:
        pos = positions_of(word)
        if not pos:
            raise InversionChainError(f"the reweight word '{user_text(word)}' is not in the target prompt "
                                      f"'{user_text(target_prompt)}'. Its {kind} are: {readable_tokens()}.")
        equalizer[pos] = c
    return equalizer


def build_t5_plan(clip, source_prompt: str, target_prompt: str, mode: str, reweight: str = "") -> EditPlan:
    return build_stream_plan(clip, T5_STREAM, source_prompt, target_prompt, mode, reweight)


def build_stream_plan(clip, stream: TextStream, source_prompt: str, target_prompt: str, mode: str,
                      reweight: str = "") -> EditPlan:
    """The plan over the text tokens a DiT reads (``stream``: T5 on Flux and Chroma, Qwen2.5 on Qwen-Image;
    position p = text token p of the joint sequence, no start token): replace needs the same number of prompt
    tokens, refine aligns the two sequences (longest common subsequence, as for CLIP), reweight scales every
    occurrence of a word's pieces in the target."""
    if mode not in MODES:
        raise InversionChainError(f"unknown mode '{user_text(mode)}'; use one of {', '.join(MODES)}.")
    src, tgt = stream.ids(clip, source_prompt), stream.ids(clip, target_prompt)
    ns, nt = stream.word_count(clip, src), stream.word_count(clip, tgt)
    weights = parse_reweight(reweight)
    if mode == "reweight" and not weights:
        raise InversionChainError(f"mode 'reweight' needs `reweight`, e.g. 'flowers:2.0' (a word of the "
                                  f"target prompt and a scale in [{REWEIGHT_RANGE[0]:g}, {REWEIGHT_RANGE[1]:g}]).")
    word_swap = mode == "replace" or (mode == "reweight" and ns == nt)
    if word_swap and ns != nt:
        show = lambda ids, n: user_text(", ".join(stream.readable(clip, ids[:n])))  # noqa: E731
        raise InversionChainError(
            f"mode 'replace' swaps words token for token, but the source prompt has {ns} {stream.name} tokens "
            f"({show(src, ns)}) and the target prompt {nt} ({show(tgt, nt)}). Use mode 'refine' for prompts of "
            f"different lengths, or choose replacement words with the same number of {stream.name} tokens.")
    if len(src) != len(tgt):
        raise InversionChainError(
            f"the source and target prompts are {len(src)} and {len(tgt)} text tokens long (this CLIP does "
            f"not pad {stream.name} to a fixed length, as Chroma's and Qwen-Image's do not); both rows of the edit are "
            f"sampled in one batch, which needs equal lengths. Choose prompts with the same number of {stream.name} "
            f"tokens.")
    n = len(tgt)
    mapper, aligned = _alignment(src, tgt, n, word_swap)
    equalizer = _equalizer(weights, n, lambda word: stream.word_positions(clip, tgt, word), target_prompt,
                           lambda: user_text(", ".join(stream.readable(clip, tgt[:nt]))), f"{stream.name} tokens")
    return EditPlan(mode=mode, source_ids=src, target_ids=tgt, mapper=mapper, aligned=aligned, equalizer=equalizer,
                    reweight=weights, words=nt)
