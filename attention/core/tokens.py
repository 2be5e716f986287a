"""Finding words of a prompt among its CLIP tokens (real tokenization through the CLIP object)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch

from ...artifacts import InversionChainError, user_text

START, END = 49406, 49407
MAX_TOKENS = 77


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


def locate_words(clip, prompt: str, words: Sequence[str], input_name: str) -> Dict[str, List[int]]:
    """Positions (in the 77-token sequence) of each word's tokens in ``prompt``; a clear error for absent words,
    naming the input they came from (``input_name``, e.g. "`mask_words`")."""
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
            if pieces and _in_later_window(clip, prompt, pieces):
                raise InversionChainError(
                    f"{input_name}: the word '{user_text(word)}' is in the prompt, but after its first {len(ids) - 2} "
                    f"tokens (CLIP's "
                    f"first 77-token window), and only that window's attention maps are used. Move the word earlier "
                    f"or shorten the prompt '{_cut(prompt)}'.")
            valid = user_text(", ".join(readable_tokens(clip, ids[:end + 1])))
            raise InversionChainError(f"{input_name}: the word '{user_text(word)}' is not in the prompt "
                                      f"'{_cut(prompt)}'. Its tokens are: {valid}.")
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
    """A prompt cut for a message, HTML-escaped."""
    return user_text(text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)")


def parse_words(text: str) -> List[str]:
    return [w.strip() for w in (text or "").replace(";", ",").split(",") if w.strip()]


# -- token sequences for Prompt-to-Prompt (one CLIP window, alignment, word positions) ---------------------------
def _first_encoder_chunks(clip, text: str) -> list:
    tokens = clip.tokenize(text)
    if isinstance(tokens, dict):  # SDXL: {"g": ..., "l": ...}; token positions agree between the encoders
        tokens = tokens[sorted(tokens.keys())[0]]
    return tokens


def _id_of(token, position: int) -> int:
    t = token[0] if isinstance(token, (tuple, list)) else token
    if isinstance(t, torch.Tensor):  # a textual-inversion embedding vector: a token id that matches nothing
        return -1000 - position
    return int(t)


def prompt_tokens(clip, text: str, role: str) -> List[int]:
    """The 77 token ids of ``text`` (start token at 0); a clear error when the prompt needs more than one window."""
    chunks = _first_encoder_chunks(clip, text)
    if len(chunks) > 1:
        used = 0
        for chunk in chunks:
            ids = [_id_of(t, i) for i, t in enumerate(chunk)]
            used += sum(1 for t in ids if t not in (START, END, 0))
        raise InversionChainError(
            f"the {role} '{_cut(text, 60)}' is {used} tokens long; "
            f"Prompt-to-Prompt edits one CLIP window of {MAX_TOKENS} tokens ({MAX_TOKENS - 2} plus start/end). "
            f"Shorten the prompt.")
    return [_id_of(t, i) for i, t in enumerate(chunks[0])]


def token_count(ids: Sequence[int]) -> int:
    """Tokens up to and including the end token."""
    return (list(ids).index(END) + 1) if END in ids else len(ids)


def align_tokens(source: Sequence[int], target: Sequence[int]) -> List[int]:
    """Global alignment of two token sequences keeping the largest number of identical tokens in order (a longest
    common subsequence; substitutions never pay). Returns, for every target position, the source position it is
    aligned with, or -1 for a token that is new in the target."""
    n, m = len(source), len(target)
    # score[i][j]: best number of matches aligning source[i:] with target[j:]
    score = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        row, below = score[i], score[i + 1]
        for j in range(m - 1, -1, -1):
            if source[i] == target[j]:
                row[j] = below[j + 1] + 1
            else:
                row[j] = below[j] if below[j] >= row[j + 1] else row[j + 1]
    mapper = [-1] * m
    i = j = 0
    while i < n and j < m:
        if source[i] == target[j] and score[i][j] == score[i + 1][j + 1] + 1:
            mapper[j] = i
            i += 1
            j += 1
        elif score[i + 1][j] >= score[i][j + 1]:
            i += 1          # a source token the target dropped
        else:
            j += 1          # a token that is new in the target
    return mapper


def word_positions(clip, ids: Sequence[int], word: str) -> List[int]:
    """Every position of ``word``'s tokens in ``ids`` (all occurrences), [] if absent."""
    pieces = [t for t in prompt_tokens(clip, word, "word") if t not in (START, END, 0)]
    end = token_count(ids) - 1
    found = []
    if not pieces:
        return found
    for start in range(1, end - len(pieces) + 1):
        if list(ids[start:start + len(pieces)]) == pieces:
            found.extend(range(start, start + len(pieces)))
    return found


def describe_tokens(clip, ids: Sequence[int]) -> str:
    """The readable tokens of a 77-token sequence up to its end token, for error messages (HTML-escaped)."""
    return user_text(", ".join(readable_tokens(clip, list(ids[:token_count(ids)]))))


# -- T5 (the text stream Flux and Chroma read): sentencepiece pieces, no start token, one window -------------------
T5_KEY = "t5xxl"   # the key of the T5 stream in ``clip.tokenize``'s dict (FluxTokenizer, PixArtTokenizer, SD3Tokenizer)


def t5_tokenizer(clip):
    """The T5 ``SDTokenizer`` of a Flux / Chroma / SD3 CLIP (its ``end_token`` and HF tokenizer), or None."""
    tok = getattr(clip, "tokenizer", None)
    for name in (T5_KEY, "clip_" + T5_KEY):
        sub = getattr(tok, name, None)
        if sub is not None and hasattr(sub, "tokenizer"):
            return sub
    return None


def t5_ids(clip, text: str) -> List[int]:
    """Every id of ``text``'s T5 stream, in the order the DiT reads the text tokens (ComfyUI's T5 tokenizers keep
    one window; Flux pads it to 256 tokens, Chroma does not pad): position p here is text token p of the model."""
    tokens = clip.tokenize(text)
    if not isinstance(tokens, dict) or T5_KEY not in tokens:
        raise InversionChainError(f"a T5 text stream was expected from this CLIP; it tokenizes for "
                                  f"{', '.join(sorted(tokens)) if isinstance(tokens, dict) else 'one CLIP'} only.")
    ids: List[int] = []
    for chunk in tokens[T5_KEY]:
        ids.extend(_id_of(t, len(ids) + i) for i, t in enumerate(chunk))
    return ids


def t5_word_count(clip, ids: Sequence[int]) -> int:
    """Tokens before the first end token (``</s>``): the prompt's pieces."""
    end = getattr(t5_tokenizer(clip), "end_token", None)
    ids = list(ids)
    return ids.index(end) if end in ids else len(ids)


def t5_readable(clip, ids: Sequence[int]) -> List[str]:
    """Sentencepiece pieces of ``ids`` with the word-start mark removed."""
    inner = getattr(t5_tokenizer(clip), "tokenizer", None)
    if inner is None:
        return [str(t) for t in ids]
    return [s.replace("\u2581", "") or s for s in inner.convert_ids_to_tokens([int(t) for t in ids])]


def t5_locate_words(clip, prompt: str, words: Sequence[str], input_name: str) -> Dict[str, List[int]]:
    """Positions (text token p of the DiT) of each word's T5 pieces in ``prompt``, first occurrence; ComfyUI
    tokenizes every space-separated word alone, so a word's pieces are the same alone and in the prompt."""
    ids = t5_ids(clip, prompt)
    end = t5_word_count(clip, ids)
    found: Dict[str, List[int]] = {}
    for word in words:
        pieces = t5_ids(clip, word)
        pieces = pieces[:t5_word_count(clip, pieces)]
        hit = next((list(range(s, s + len(pieces))) for s in range(0, end - len(pieces) + 1)
                    if pieces and ids[s:s + len(pieces)] == pieces), None)
        if hit is None:
            valid = user_text(", ".join(t5_readable(clip, ids[:end])))
            raise InversionChainError(f"{input_name}: the word '{user_text(word)}' is not in the prompt "
                                      f"'{_cut(prompt)}'. "
                                      f"Its T5 tokens are: {valid}.")
        found[word] = hit
    return found


# -- Qwen2.5 (the text stream Qwen-Image reads): byte-level BPE in ComfyUI's chat template ------------------------
QWEN_KEY = "qwen25_7b"
IM_START, IM_END, USER, NEWLINE = 151644, 151645, 872, 198


def qwen_tokenizer(clip):
    """The Qwen2.5 ``SDTokenizer`` of a Qwen-Image CLIP, or None."""
    sub = getattr(getattr(clip, "tokenizer", None), QWEN_KEY, None)
    return sub if sub is not None and hasattr(sub, "tokenizer") else None


def qwen_ids(clip, text: str) -> List[int]:
    """The ids the Qwen-Image DiT reads as text tokens: ComfyUI's template-wrapped tokens from the user turn on
    (its text encoder drops the system turn and ``<|im_start|>user``, the rule in comfy/text_encoders/qwen_image.py)."""
    tokens = clip.tokenize(text)
    ids = [_id_of(t, i) for chunk in tokens[QWEN_KEY] for i, t in enumerate(chunk)]
    starts = [i for i, t in enumerate(ids) if t == IM_START][:2]
    cut = starts[-1] if starts else 0
    if ids[cut + 1:cut + 3] == [USER, NEWLINE]:
        cut += 3
    return ids[cut:]


def qwen_word_count(ids: Sequence[int]) -> int:
    """The user prompt's tokens: those before the template's ``<|im_end|>``."""
    ids = list(ids)
    return ids.index(IM_END) if IM_END in ids else len(ids)


def qwen_readable(clip, ids: Sequence[int]) -> List[str]:
    inner = getattr(qwen_tokenizer(clip), "tokenizer", None)
    if inner is None:
        return [str(t) for t in ids]
    return [s.replace("\u0120", "") or s for s in inner.convert_ids_to_tokens([int(t) for t in ids])]


def qwen_locate_words(clip, prompt: str, words: Sequence[str], input_name: str) -> Dict[str, List[int]]:
    """Positions (text token p of the DiT) of each word's BPE pieces in ``prompt``, first occurrence: a word is
    looked for with its leading space (inside the prompt) and without (at its start)."""
    ids = qwen_ids(clip, prompt)
    end = qwen_word_count(ids)
    inner = qwen_tokenizer(clip).tokenizer
    found: Dict[str, List[int]] = {}
    for word in words:
        hit = None
        for variant in (" " + word.strip(), word.strip()):
            pieces = inner.encode(variant, add_special_tokens=False)
            hit = next((list(range(s, s + len(pieces))) for s in range(0, end - len(pieces) + 1)
                        if pieces and ids[s:s + len(pieces)] == pieces), None)
            if hit is not None:
                break
        if hit is None:
            valid = user_text(", ".join(qwen_readable(clip, ids[:end])))
            raise InversionChainError(f"{input_name}: the word '{user_text(word)}' is not in the prompt "
                                      f"'{_cut(prompt)}'. "
                                      f"Its Qwen tokens are: {valid}.")
        found[word] = hit
    return found


def t5_word_positions(clip, ids: Sequence[int], word: str) -> List[int]:
    """Every position of ``word``'s T5 pieces among the prompt tokens of ``ids`` (all occurrences), [] if absent."""
    pieces = t5_ids(clip, word)
    pieces = pieces[:t5_word_count(clip, pieces)]
    end = t5_word_count(clip, ids)
    found: List[int] = []
    for s in range(0, end - len(pieces) + 1) if pieces else ():
        if list(ids[s:s + len(pieces)]) == pieces:
            found.extend(range(s, s + len(pieces)))
    return found


def qwen_word_positions(clip, ids: Sequence[int], word: str) -> List[int]:
    """Every position of ``word``'s BPE pieces among the prompt tokens of ``ids`` (with its leading space inside the
    prompt, without at its start; all occurrences), [] if absent."""
    inner = qwen_tokenizer(clip).tokenizer
    end = qwen_word_count(ids)
    found: List[int] = []
    for variant in (" " + word.strip(), word.strip()):
        pieces = inner.encode(variant, add_special_tokens=False)
        for s in range(0, end - len(pieces) + 1) if pieces else ():
            if list(ids[s:s + len(pieces)]) == pieces and s not in found:
                found.extend(range(s, s + len(pieces)))
    return sorted(set(found))


@dataclass(frozen=True)
class TextStream:
    """How a DiT reads a prompt as text tokens (position p = text token p of its joint sequence): the tokens' name
    and the lookups over them. T5 for Flux and Chroma, Qwen2.5 for Qwen-Image."""
    name: str
    tokenizer: Callable
    ids: Callable
    word_count: Callable      # (clip, ids) -> the prompt's tokens before the stream's end marker
    readable: Callable
    word_positions: Callable  # (clip, ids, word) -> every position of the word's pieces


T5_STREAM = TextStream("T5", t5_tokenizer, t5_ids, t5_word_count, t5_readable, t5_word_positions)
QWEN_STREAM = TextStream("Qwen", qwen_tokenizer, qwen_ids, lambda clip, ids: qwen_word_count(ids), qwen_readable,
                         qwen_word_positions)
