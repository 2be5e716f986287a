"""Prompt-to-Prompt and P2Plus editors: attention-map exchange between a source row and a target row.

Batch layout. The latent has two rows, 0 = source (reconstructs the real image), 1 = target (the edit); both start
from the same x_T. Inside a UNet call ``ctx.chunk_rows(0)`` are the cond rows and ``ctx.chunk_rows(1)`` the uncond
rows; within a chunk the first row is the source, the second the target.

What is exchanged, and when (``i`` = sampling step, ``N`` = steps; a step is replaced while ``i / N < tau``, the
pack's one schedule vocabulary, so tau = 1 replaces every step and tau = 0 none):
- cross-attention, cond branch, every layer, while ``i / N < cross_replace_end_percent`` (tau_c): the target's probability maps
  become the source's, column by column through an :class:`EditPlan` (replace: same token positions; refine: target
  tokens aligned to the source tokens, new tokens keep their own maps; reweight: chosen target tokens' maps scaled
  by c, on the replace mapping when the token counts match, else on the refine alignment; ``reweight`` words scale
  in the other modes too, as Prompt-to-Prompt composes its reweight controller with a replace/refine one).
  The values stay the target's own (``out_t = P_s V_t``).
- self-attention, cond branch, while ``i / N < self_replace_end_percent`` (tau_s), only in layers whose token grid is at most
  ``self_max_res`` x ``self_max_res``. Default 32 (32x32 = 1024 tokens), as the P2Plus/StyleDiffusion code and the
  authors' later null-text notebook do; the first Prompt-to-Prompt notebook used 16 (only the 16x16 and 8x8
  layers of SD1.x at 512 px). The limit is in tokens, as in the papers' code, so it selects fewer layers at larger
  images.
- P2Plus: self-attention in the **uncond** branch, same layers, while ``i / N < uncond_self_replace_end_percent`` (tau_u).
  With tau_u = 0 this is exactly Prompt-to-Prompt.

Cheap where possible. A replaced map ``softmax(q_s k_s^T)`` is what the target gets when its queries and keys are
the source's, so self-attention replacement and word-swap cross-attention replacement only copy the source row's
q and k into the target row and let ComfyUI's own attention kernel run (no probability tensor is ever built).
Only refine/reweight cross-attention (a column permutation / scaling of the maps) and the local-blend recording
(16x16-level maps of chosen words) compute probabilities explicitly; both are small (77 keys).

Local blend (``LocalBlend``): the chosen words' cross-attention maps (cond rows, after the exchange, the layers at
level 2 = latent / 4, i.e. 16x16 for SD1.x at 512 px; summed over heads, layers and all steps so far), 3x3 max-pooled,
upsampled (nearest) to the latent, normalised by their maximum and thresholded: the target row keeps its own latent
inside the union of the source's and the target's masks and takes the source row's outside. It runs as a post-CFG
function: it rewrites the target's x0 prediction so that the sampler's DDIM/Euler step
``x' = x + (s' - s) (x - x0) / s`` lands exactly on ``x_src' + m (x_tgt' - x_src')`` (exact for the ddim and euler
samplers, which the pack's workflows use).

Null-text (per-step unconditional embeddings) is applied by :class:`UncondContext`, a cross-attention
pre-projection patch that gives the uncond rows the step's embedding before ComfyUI projects it to K/V; stock
samplers take one negative CONDITIONING for every step, so this is the only way to vary it per step without a
custom sampler.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..artifacts import InversionChainError
from .controller import CallContext, Editor, attention_probs
from .schedule import Schedule, locate
from .tokens import END, START, readable_tokens

MODES = ("replace", "refine", "reweight")
MAX_TOKENS = 77
REWEIGHT_RANGE = (-2.0, 2.0)
DEFAULT_SELF_MAX_RES = 32
BLEND_LEVEL = 2          # cross-attention maps at latent / 4 (16x16 for SD1.x at 512 px), as Prompt-to-Prompt
log = logging.getLogger("inversion_chain")


# -- tokens ---------------------------------------------------------------------------------------------------
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


def prompt_tokens(clip, text: str, what: str, role: str) -> List[int]:
    """The 77 token ids of ``text`` (start token at 0); a clear error when the prompt needs more than one window."""
    chunks = _first_encoder_chunks(clip, text)
    if len(chunks) > 1:
        used = 0
        for chunk in chunks:
            ids = [_id_of(t, i) for i, t in enumerate(chunk)]
            used += sum(1 for t in ids if t not in (START, END, 0))
        raise InversionChainError(
            f"{what}: the {role} '{text[:60]}{'...' if len(text) > 60 else ''}' is {used} tokens long; "
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
    pieces = [t for t in prompt_tokens(clip, word, "word lookup", "word") if t not in (START, END, 0)]
    end = token_count(ids) - 1
    found = []
    if not pieces:
        return found
    for start in range(1, end - len(pieces) + 1):
        if list(ids[start:start + len(pieces)]) == pieces:
            found.extend(range(start, start + len(pieces)))
    return found


def parse_reweight(text: str, what: str) -> List[Tuple[str, float]]:
    """``"flowers:2.0, red car:-1"`` -> [("flowers", 2.0), ("red car", -1.0)]."""
    out = []
    for item in (text or "").replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        word, sep, value = item.rpartition(":")
        if not sep or not word.strip():
            raise InversionChainError(f"{what}: reweight entry '{item}' must look like 'word:value', e.g. "
                                      f"'flowers:2.0' (values in [{REWEIGHT_RANGE[0]:g}, {REWEIGHT_RANGE[1]:g}]).")
        try:
            c = float(value)
        except ValueError:
            raise InversionChainError(f"{what}: reweight value '{value.strip()}' of '{word.strip()}' is not a number.")
        if not REWEIGHT_RANGE[0] <= c <= REWEIGHT_RANGE[1]:
            raise InversionChainError(f"{what}: reweight value {c:g} for '{word.strip()}' is outside "
                                      f"[{REWEIGHT_RANGE[0]:g}, {REWEIGHT_RANGE[1]:g}].")
        out.append((word.strip(), c))
    return out


def _describe(clip, ids: Sequence[int]) -> str:
    return ", ".join(readable_tokens(clip, list(ids[:token_count(ids)])))


# -- the edit ---------------------------------------------------------------------------------------------------
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

    @property
    def word_swap(self) -> bool:
        """True when the target's maps are the source's unchanged (the q/k copy does it, no explicit maps)."""
        n = self.mapper.numel()
        return (self.equalizer is None and bool(self.aligned.eq(1).all())
                and torch.equal(self.mapper, torch.arange(n, dtype=self.mapper.dtype)))

    def describe(self) -> str:
        new = int((self.aligned == 0).sum())
        out = f"{self.mode}: {token_count(self.target_ids) - 2} target tokens, {new} new"
        if self.reweight:
            out += ", reweight " + ", ".join(f"{w}:{c:g}" for w, c in self.reweight)
        return out


def build_plan(clip, source_prompt: str, target_prompt: str, mode: str, reweight: str = "",
               what: str = "P2Plus Controller") -> EditPlan:
    if mode not in MODES:
        raise InversionChainError(f"{what}: unknown mode '{mode}'; use one of {', '.join(MODES)}.")
    src = prompt_tokens(clip, source_prompt, what, "source prompt")
    tgt = prompt_tokens(clip, target_prompt, what, "target prompt")
    if len(src) != len(tgt):
        raise InversionChainError(f"{what}: the source and target prompts tokenize to different window sizes "
                                  f"({len(src)} vs {len(tgt)}).")
    n = len(tgt)
    weights = parse_reweight(reweight, what)
    if mode == "reweight" and not weights:
        raise InversionChainError(f"{what}: mode 'reweight' needs `reweight`, e.g. 'flowers:2.0' (a word of the "
                                  f"target prompt and a scale in [{REWEIGHT_RANGE[0]:g}, {REWEIGHT_RANGE[1]:g}]).")
    if mode == "replace" or (mode == "reweight" and token_count(src) == token_count(tgt)):
        if token_count(src) != token_count(tgt):
            raise InversionChainError(
                f"{what}: mode 'replace' swaps words token for token, but the source prompt has "
                f"{token_count(src) - 2} tokens ({_describe(clip, src)}) and the target prompt "
                f"{token_count(tgt) - 2} ({_describe(clip, tgt)}). Use mode 'refine' for prompts of different "
                f"lengths, or choose replacement words with the same number of tokens.")
        mapper = torch.arange(n, dtype=torch.long)
        aligned = torch.ones(n)
    else:
        pairs = align_tokens(src, tgt)
        mapper = torch.tensor([p if p >= 0 else j for j, p in enumerate(pairs)], dtype=torch.long)
        aligned = torch.tensor([1.0 if p >= 0 else 0.0 for p in pairs])
    equalizer = None
    if weights:
        equalizer = torch.ones(n)
        for word, c in weights:
            pos = word_positions(clip, tgt, word)
            if not pos:
                raise InversionChainError(f"{what}: the reweight word '{word}' is not in the target prompt "
                                          f"'{target_prompt}'. Its tokens are: {_describe(clip, tgt)}.")
            equalizer[pos] = c
    return EditPlan(mode=mode, source_ids=src, target_ids=tgt, mapper=mapper, aligned=aligned, equalizer=equalizer,
                    reweight=weights)


# -- local blend ------------------------------------------------------------------------------------------------
class LocalBlend:
    """Mask from chosen words' cross-attention; keeps the target row equal to the source row outside it."""

    def __init__(self, source_positions: Sequence[int], target_positions: Sequence[int], threshold: float,
                 start_percent: float, level: int, schedule: Schedule):
        self.positions = (list(source_positions), list(target_positions))
        self.threshold = float(threshold)
        self.start_percent = float(start_percent)
        self.level = int(level)
        self.schedule = schedule
        self.maps: Dict[Tuple[int, int], torch.Tensor] = {}   # (step, layer) -> (2, h, w) word maps
        self.last_mask: Optional[torch.Tensor] = None          # (1, 1, H, W) bool of the latest blended step

    def __deepcopy__(self, memo):  # 2024-03 clone() deep-copies model_options
        return self

    def to(self, device):
        return self

    def reset(self):
        self.maps.clear()
        self.last_mask = None

    def record(self, step: int, layer_index: int, probs: torch.Tensor, grid: Tuple[int, int]):
        """``probs``: (2, heads, Nq, Nk) cross-attention of the cond (source, target) rows."""
        mean = probs.float().mean(1)                                      # (2, Nq, Nk)
        rows = [mean[r][:, self.positions[r]].sum(-1) if self.positions[r] else mean.new_zeros(mean.shape[1])
                for r in range(2)]
        self.maps[(step, layer_index)] = torch.stack(rows).reshape(2, *grid)

    def mask(self, step: int, size: Tuple[int, int]) -> Optional[torch.Tensor]:
        maps = [m for (s, _), m in self.maps.items() if s <= step]
        if not maps:
            return None
        total = torch.stack(maps).sum(0)[:, None]                          # (2, 1, h, w)
        total = F.max_pool2d(total, 3, stride=1, padding=1)
        total = F.interpolate(total, size=tuple(size), mode="nearest")
        total = total / total.flatten(1).amax(1).clamp_min(1e-12)[:, None, None, None]
        rows = total > self.threshold
        return rows[:1] | rows[1:2]                                        # union of source and target masks

    def __call__(self, args):
        """Post-CFG function: ``args["denoised"]`` (x0 predictions of both rows) -> blended x0 predictions."""
        x, denoised = args["input"], args["denoised"]
        if x.shape[0] != 2:
            return denoised
        sigma = float(args["sigma"].flatten()[0])
        i = locate(sigma, self.schedule.sigmas)
        if i is None or i >= self.schedule.steps or self.schedule.fraction(i) < self.start_percent:
            return denoised
        m = self.mask(i, x.shape[-2:])
        if m is None:
            return denoised
        m = m.to(denoised.device, denoised.dtype)[0]
        a = float(self.schedule.sigmas[i + 1]) / sigma                    # x' = a x + (1 - a) x0
        src_next_x0 = denoised[0] + (a / (1.0 - a)) * (x[0] - x[1])       # x0 that steps row 1 onto row 0's x'
        out = denoised.clone()
        out[1] = m * denoised[1] + (1 - m) * src_next_x0
        self.last_mask = m.bool()[None].cpu()
        return out


# -- the editor -------------------------------------------------------------------------------------------------
@dataclass
class _CallPlan:
    swap_rows: List[Tuple[int, int]]    # (source row, target row) pairs whose q/k the target takes
    explicit: bool                      # map the cond target's cross-attention columns explicitly
    record: bool                        # record local-blend maps from this call
    step: int
    cond: List[int]


class P2PlusEditor(Editor):
    """Prompt-to-Prompt (cond branch) plus P2Plus (uncond self-attention) on a 2-row batch (source, target)."""

    order = 50
    kinds = ("self", "cross")

    def __init__(self, plan: EditPlan, schedule: Schedule, cross_replace_end_percent: float,
                 self_replace_end_percent: float, uncond_self_replace_end_percent: float, self_max_res: int = DEFAULT_SELF_MAX_RES,
                 blend: Optional[LocalBlend] = None, what: str = "P2Plus Controller"):
        self.plan = plan
        self.sched = schedule
        self.cross_end = float(cross_replace_end_percent)
        self.self_end = float(self_replace_end_percent)
        self.uncond_self_end = float(uncond_self_replace_end_percent)
        self.self_max_tokens = int(self_max_res) ** 2
        self.blend = blend
        self.what = what
        self._key = f"p2plus_{id(self)}"
        self._word_swap = plan.word_swap
        self._device_cache: Dict[tuple, tuple] = {}

    def schedule(self):
        return self.sched.sigmas

    def begin_run(self):
        if self.blend is not None:
            self.blend.reset()

    def _rows(self, ctx: CallContext, which: int) -> List[int]:
        rows = ctx.chunk_rows(which)
        if rows and ctx.rows_per_chunk != 2:
            raise InversionChainError(
                f"{self.what}: expected a 2-row latent (row 0 source, row 1 target), got {ctx.rows_per_chunk} rows "
                f"per branch. Sample the LATENT output of P2Plus Controller as it is, with its positive/negative.")
        return rows

    def active(self, ctx: CallContext) -> bool:
        step = self.sched.step(ctx.step)
        f = self.sched.fraction(step)
        cond, uncond = self._rows(ctx, 0), self._rows(ctx, 1)
        swap, explicit, record = [], False, False
        if ctx.kind == "cross":
            if cond and f < self.cross_end:
                if self._word_swap:
                    swap.append((cond[0], cond[1]))
                else:
                    explicit = True
            record = bool(cond) and self.blend is not None and ctx.layer.level == self.blend.level
        else:
            small = ctx.grid[0] * ctx.grid[1] <= self.self_max_tokens
            if small and cond and f < self.self_end:
                swap.append((cond[0], cond[1]))
            if small and uncond and f < self.uncond_self_end:
                swap.append((uncond[0], uncond[1]))
        if not (swap or explicit or record):
            return False
        ctx.scratch[self._key] = _CallPlan(swap_rows=swap, explicit=explicit, record=record, step=step, cond=cond)
        return True

    def edit_qkv(self, q, k, v, ctx):
        call: _CallPlan = ctx.scratch[self._key]
        if call.swap_rows:
            src = [s for s, _ in call.swap_rows]
            tgt = [t for _, t in call.swap_rows]
            q, k = q.clone(), k.clone()
            q[tgt] = q[src]
            k[tgt] = k[src]
        if call.record and not call.explicit:
            self.blend.record(call.step, ctx.layer.index, attention_probs(q[call.cond], k[call.cond], ctx.heads),
                              ctx.grid)
        return q, k, v

    def needs_probs(self, ctx: CallContext) -> bool:
        return ctx.scratch[self._key].explicit

    def _plan_tensors(self, device, nk: int):
        key = (device, nk)
        if key not in self._device_cache:
            if nk != self.plan.mapper.numel():
                raise InversionChainError(
                    f"{self.what}: the cross-attention has {nk} context tokens, expected {self.plan.mapper.numel()}. "
                    f"Use the positive/negative outputs of P2Plus Controller, not other conditioning.")
            eq = None if self.plan.equalizer is None else self.plan.equalizer.to(device)
            self._device_cache[key] = (self.plan.mapper.to(device), self.plan.aligned.to(device), eq)
        return self._device_cache[key]

    def edit_probs(self, probs, ctx):
        call: _CallPlan = ctx.scratch[self._key]
        if call.explicit:
            s, t = call.cond
            mapper, aligned, eq = self._plan_tensors(probs.device, probs.shape[-1])
            new = probs[s][..., mapper] * aligned + probs[t] * (1 - aligned)
            if eq is not None:
                new = new * eq
            probs = probs.clone()
            probs[t] = new
            if call.record:
                self.blend.record(call.step, ctx.layer.index, probs[call.cond], ctx.grid)
        return probs


# -- null-text: per-step uncond context -------------------------------------------------------------------------
class UncondContext:
    """attn2 pre-projection patch ``(n, context, value, extra_options) -> (n, context, value)``: the uncond rows'
    context (and value input) become the step's optimised null-text embedding. ComfyUI projects them to K/V after
    this patch, so every layer sees exactly what ``apply_model(c_crossattn=embedding)`` would."""

    def __init__(self, embeddings: torch.Tensor, schedule: Schedule):
        self.embeddings = embeddings          # (steps, 1, tokens, dim)
        self.schedule = schedule
        self._cache: Dict[tuple, torch.Tensor] = {}

    def __deepcopy__(self, memo):
        return self

    def to(self, device):
        return self

    def embedding(self, step: int, device, dtype) -> torch.Tensor:
        key = (step, device, dtype)
        if key not in self._cache:
            if len(self._cache) > 4 * len(self.embeddings):
                self._cache.clear()
            self._cache[key] = self.embeddings[step].to(device=device, dtype=dtype)
        return self._cache[key]

    def __call__(self, n, context, value, extra_options):
        order = extra_options.get("cond_or_uncond") or []
        if 1 not in order or context is None:
            return n, context, value
        step = self.schedule.index(float(extra_options["sigmas"].flatten()[0]))
        emb = self.embedding(step, context.device, context.dtype)
        if tuple(context.shape[1:]) != tuple(emb.shape[1:]):
            raise InversionChainError(
                f"{self.schedule.what}: the unconditional context is {tuple(context.shape[1:])} (tokens, dim) but the "
                f"NULL_TEXT embeddings are {tuple(emb.shape[1:])}. Use the negative output of P2Plus Controller.")
        per = context.shape[0] // len(order)
        rows = [c * per + r for c, kind in enumerate(order) if kind == 1 for r in range(per)]
        same = value is context
        context = context.clone()
        context[rows] = emb
        if same:
            value = context
        elif value is not None and tuple(value.shape) == tuple(context.shape):
            value = value.clone()
            value[rows] = emb
        return n, context, value


class CfgCheck:
    """Post-CFG observer: warns once when sampling runs at another cfg than the NULL_TEXT was optimised for."""

    def __init__(self, cfg: float, what: str):
        self.cfg = float(cfg)
        self.what = what
        self.warned = False

    def __deepcopy__(self, memo):
        return self

    def to(self, device):
        return self

    def __call__(self, args):
        denoised = args["denoised"]
        if self.warned:
            return denoised
        cond, uncond = args.get("cond_denoised"), args.get("uncond_denoised")
        if cond is None or uncond is None or not torch.is_tensor(uncond):
            return denoised
        diff = (cond - uncond).float()
        norm = float((diff * diff).sum())
        if norm > 1e-12:
            scale = float(((denoised - uncond).float() * diff).sum()) / norm
            if abs(scale - self.cfg) > 0.05 * max(1.0, self.cfg):
                log.warning("[Inversion Chain] %s: sampling at cfg %.2f but the NULL_TEXT was optimised at cfg %.2f; "
                            "row 0 will not reconstruct the image exactly.", self.what, scale, self.cfg)
            self.warned = True
        return denoised
