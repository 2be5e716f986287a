"""Finding words of a prompt among its CLIP tokens (real tokenization through the CLIP object)."""
from __future__ import annotations

from typing import Dict, List, Sequence

from ..artifacts import InversionChainError

START, END = 49406, 49407


def token_ids(clip, text: str) -> List[int]:
    """Token ids of the first 77-token chunk of the first text encoder, start token at 0."""
    tokens = clip.tokenize(text)
    first = tokens[sorted(tokens.keys())[0]] if isinstance(tokens, dict) else tokens
    return [int(t[0]) if isinstance(t, (tuple, list)) else int(t) for t in first[0]]


def readable_tokens(clip, ids: Sequence[int]) -> List[str]:
    inner = _hf_tokenizer(clip)
    body = [t for t in ids[1:] if t != END]
    if inner is None:
        return [str(t) for t in body]
    return [s.replace("</w>", "") for s in inner.convert_ids_to_tokens(body)]


def _hf_tokenizer(clip):
    tok = getattr(clip, "tokenizer", None)
    for name in ("clip_l", "clip_g", "clip_h"):
        sub = getattr(tok, name, None)
        if sub is not None and hasattr(sub, "tokenizer"):
            return sub.tokenizer
    return getattr(tok, "tokenizer", None)


def locate_words(clip, prompt: str, words: Sequence[str], what: str) -> Dict[str, List[int]]:
    """Positions (in the 77-token sequence) of each word's tokens in ``prompt``; a clear error for absent words."""
    ids = token_ids(clip, prompt)
    end = ids.index(END) if END in ids else len(ids)
    found: Dict[str, List[int]] = {}
    for word in words:
        pieces = [t for t in token_ids(clip, word) if t not in (START, END)]
        hit = None
        for start in range(1, end - len(pieces) + 1):
            if ids[start:start + len(pieces)] == pieces:
                hit = list(range(start, start + len(pieces)))
                break
        if hit is None or not pieces:
            if pieces and _in_later_window(clip, prompt, pieces):
                raise InversionChainError(
                    f"{what}: the word '{word}' is in the prompt, but after its first {len(ids) - 2} tokens (CLIP's "
                    f"first 77-token window), and only that window's attention maps are used. Move the word earlier "
                    f"or shorten the prompt '{_cut(prompt)}'.")
            valid = ", ".join(readable_tokens(clip, ids[:end + 1]))
            raise InversionChainError(f"{what}: the word '{word}' is not in the prompt '{_cut(prompt)}'. Its tokens "
                                      f"are: {valid}.")
        found[word] = hit
    return found


def _in_later_window(clip, prompt: str, pieces: List[int]) -> bool:
    """Whether ``pieces`` occur in the prompt's 77-token chunks after the first (long prompts)."""
    tokens = clip.tokenize(prompt)
    chunks = tokens[sorted(tokens.keys())[0]] if isinstance(tokens, dict) else tokens
    for chunk in chunks[1:]:
        ids = [int(t[0]) if isinstance(t, (tuple, list)) else int(t) for t in chunk]
        if any(ids[i:i + len(pieces)] == pieces for i in range(len(ids) - len(pieces) + 1)):
            return True
    return False


def _cut(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def parse_words(text: str) -> List[str]:
    return [w.strip() for w in (text or "").replace(";", ",").split(",") if w.strip()]
