"""Finding words of a prompt among its CLIP tokens (real tokenization through the CLIP object)."""
from __future__ import annotations

from typing import Dict, List, Sequence

from ..artifacts import InversionChainError

START, END = 49406, 49407


def token_ids(clip, text: str) -> List[int]:
    """Token ids of the first 77-token chunk of the first text encoder, start token at 0. SDXL tokenizes for two
    encoders (a dict); both use CLIP's vocabulary, so positions agree and either gives them."""
    tokens = clip.tokenize(text)
    first = tokens[sorted(tokens.keys())[0]] if isinstance(tokens, dict) else tokens
    return [int(t[0]) if isinstance(t, (tuple, list)) else int(t) for t in first[0]]


def body(ids: Sequence[int]) -> List[int]:
    """The tokens between the start token and the first end token. Padding differs per family (SD1's tokenizer
    pads with the end token, SD2's and SDXL's CLIP-G with id 0), so nothing after the end token is a word."""
    ids = list(ids)
    start = 1 if ids and ids[0] == START else 0
    end = ids.index(END, start) if END in ids[start:] else len(ids)
    return ids[start:end]


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
        pieces = body(token_ids(clip, word))
        hit = None
        for start in range(1, end - len(pieces) + 1):
            if ids[start:start + len(pieces)] == pieces:
                hit = list(range(start, start + len(pieces)))
                break
        if hit is None or not pieces:
            valid = ", ".join(readable_tokens(clip, ids[:end + 1]))
            raise InversionChainError(f"{what}: the word '{word}' is not in the prompt '{prompt}'. Its tokens are: "
                                      f"{valid}.")
        found[word] = hit
    return found


def parse_words(text: str) -> List[str]:
    return [w.strip() for w in (text or "").replace(";", ",").split(",") if w.strip()]
