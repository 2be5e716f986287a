"""The controller that runs a model's editors at every patched attention call, and the editor interface.

An editor is a small object; the controller calls, for each attention call where ``editor.active(ctx)``:
  1. ``edit_qkv(q, k, v, ctx) -> (q, k, v)``   (e.g. KV injection swaps in a reference image's keys/values)
  2. ``attend(q, k, v, ctx) -> out | None``    (an editor may compute the attention itself, e.g. with a mask)
  3. ``edit_probs(probs, ctx) -> probs``        (only if some active editor has ``needs_probs(ctx)``: P2P, capture)
  4. ``edit_out(out, ctx) -> out``
Editors run in ascending ``order`` (sources of K/V 10, map editors 50, observers 90), ties in installation order.
Tensors are ComfyUI's projected ``(B, N, heads * dim_head)``; probabilities are ``(B, heads, Nq, Nk)``.
When no editor is active the call falls through to what would have run anyway (another pack's replace patch, or
ComfyUI's own attention kernel), so an inactive editor changes nothing, bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ...compat import PatchObject
from .layers import AttentionLayer
from .schedule import RunTracker, StepInfo, locate

CONTROLLER_KEY = "inversion_chain"          # transformer_options key holding the model's Controller
REFERENCE_PASS_KEY = "inversion_chain_reference_pass"  # set while a reference image's K/V are being recorded


@dataclass
class CallContext:
    kind: str                       # "self" (attn1) or "cross" (attn2)
    layer: AttentionLayer
    step: StepInfo
    cond_or_uncond: Sequence[int]   # chunk order of the batch: 0 = cond, 1 = uncond
    rows_per_chunk: int
    grid: Tuple[int, int]           # token grid (h, w) of this layer's queries
    heads: int
    extra_options: dict
    reference_pass: object = None   # the recorder during a reference pass, else None
    scratch: dict = field(default_factory=dict)  # per-call space shared by editors
    # the attention kernel ``(q, k, v) -> out`` the controller runs when no editor attends itself; an editor may
    # wrap it in edit_qkv (e.g. RIVAL runs it per CFG branch so no call's score matrix outgrows the stock one)
    kernel: Optional[Callable] = None

    def chunk_rows(self, which: int) -> List[int]:
        """Batch indices of the chunk ``which`` (0 cond, 1 uncond)."""
        out = []
        for c, kind in enumerate(self.cond_or_uncond):
            if kind == which:
                out.extend(range(c * self.rows_per_chunk, (c + 1) * self.rows_per_chunk))
        return out


class Editor:
    """Base editor: does nothing. Subclasses override what they need."""

    order = 50
    kinds: Tuple[str, ...] = ("self", "cross")

    def layers(self, all_layers: Sequence[AttentionLayer]) -> Sequence[AttentionLayer]:
        """Layers this editor may touch (patches are installed only there)."""
        return all_layers

    def active(self, ctx: CallContext) -> bool:
        return False

    def edit_qkv(self, q, k, v, ctx):
        return q, k, v

    def attend(self, q, k, v, ctx) -> Optional[torch.Tensor]:
        return None

    def needs_probs(self, ctx: CallContext) -> bool:
        return False

    def edit_probs(self, probs, ctx):
        return probs

    def edit_out(self, out, ctx):
        return out

    def begin_run(self):
        """Called when a new sampling run starts (``schedule.RunTracker``'s rule)."""

    def schedule(self) -> Optional[torch.Tensor]:
        """The sigma schedule this editor is defined on, if it has one (e.g. its inversion's)."""
        return None

    def observe_call(self, step: StepInfo, owner):
        """Called by the Controller once per UNet call (not during reference passes): run boundaries."""
        tracker = self.__dict__.get("_runs")
        if tracker is None:
            tracker = self.__dict__["_runs"] = RunTracker()
        if tracker.new_run(step.sigma, owner):
            self.begin_run()


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, hd = t.shape
    return t.view(b, n, heads, hd // heads).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def attention_probs(q, k, heads, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) in float32: (B, heads, Nq, Nk)."""
    qh, kh = split_heads(q, heads).float(), split_heads(k, heads).float()
    sim = torch.matmul(qh, kh.transpose(-1, -2)) * (qh.shape[-1] ** -0.5)
    if bias is not None:
        sim = sim + bias
    return sim.softmax(dim=-1)


def apply_probs(probs, v, heads) -> torch.Tensor:
    return merge_heads(torch.matmul(probs, split_heads(v, heads).float()).to(v.dtype))


SCORE_CHUNK_BYTES = 2 ** 28   # float32 scores held at once by explicit_attention (SD1.5 512 px unchunked: 1 GiB)


def explicit_attention(q, k, v, heads, bias=None,
                       max_score_bytes: int = SCORE_CHUNK_BYTES) -> torch.Tensor:
    """``apply_probs(attention_probs(q, k, heads, bias), v, heads)`` over chunks of queries, so the float32 score
    matrix held at once stays under ``max_score_bytes`` (every query attends independently: same result).
    ``bias`` broadcasts to (B, heads, Nq, Nk), or has ``rows(index)`` (made per chunk, see ``bias_rows``)."""
    batch, nq, nk = q.shape[0], q.shape[1], k.shape[1]
    per_query = batch * heads * nk * 4 * (3 if hasattr(bias, "rows") else 2)   # scores, softmax (, row bias)
    chunk = max(1, int(max_score_bytes // per_query))
    if chunk >= nq:
        return apply_probs(attention_probs(q, k, heads, bias_rows(bias, 0, nq, q.device)), v, heads)
    outs = []
    for start in range(0, nq, chunk):
        part = bias_rows(bias, start, min(nq, start + chunk), q.device)
        outs.append(apply_probs(attention_probs(q[:, start:start + chunk], k, heads, part), v, heads))
    return torch.cat(outs, dim=1)


def bias_rows(bias, start: int, stop: int, device):
    """The bias of query rows ``start:stop``: a tensor's slice (or itself when it broadcasts over queries), or a
    row bias's ``rows(index)`` (an object that makes the bias of the queries asked for, e.g. masked KV Inject's
    region bias: the whole (B, Nq, Nk) bias never exists at once)."""
    if bias is None or (torch.is_tensor(bias) and bias.shape[-2] == 1):
        return bias
    if torch.is_tensor(bias):
        return bias[..., start:stop, :]
    return bias.rows(torch.arange(start, stop, device=device))


class Controller(PatchObject):
    """Immutable list of editors for one MODEL clone; adding an editor makes a new Controller.

    Stored in ``model_options["transformer_options"]``; ComfyUI hands it to every patch call. As every object the
    pack puts there it is a ``compat.PatchObject`` (deep copies and ``.to`` return the object itself).
    """

    def __init__(self, layers: Sequence[AttentionLayer], model_sampling, editors: Sequence[Editor] = ()):
        self.layers = list(layers)
        self.by_key: Dict[tuple, AttentionLayer] = {l.key: l for l in self.layers}
        self.model_sampling = model_sampling
        self.editors = sorted(editors, key=lambda e: e.order)  # stable: ties keep installation order
        self._step_cache: Tuple[Optional[torch.Tensor], Optional[StepInfo]] = (None, None)
        self._observed: Optional[torch.Tensor] = None
        # the schedule the editors are defined on (the first that has one); else the sampler's (0.3x only)
        own = next((s for s in (e.schedule() for e in self.editors) if s is not None), None)
        self._schedule = None if own is None else own.detach().float().cpu()

    def with_editor(self, editor: Editor) -> "Controller":
        return Controller(self.layers, self.model_sampling, list(self.editors) + [editor])

    # -- per call -------------------------------------------------------------------------------------------
    def layer_of(self, extra_options) -> Optional[AttentionLayer]:
        block = extra_options.get("block")
        if block is None:
            return None
        return self.by_key.get((block[0], block[1], extra_options.get("block_index", 0)))

    def step_of(self, extra_options) -> StepInfo:
        """The step of this UNet call: computed once per call (the only sigma -> step index in the pack)."""
        sigmas = extra_options["sigmas"]
        cached_sigmas, cached = self._step_cache
        if cached_sigmas is sigmas:  # same tensor object = same UNet call (holding it keeps ids from recycling)
            self._observe(sigmas, cached, extra_options)
            return cached
        sigma = float(sigmas.flatten()[0])
        schedule = self._schedule
        if schedule is None and extra_options.get("sample_sigmas") is not None:
            schedule = extra_options["sample_sigmas"].detach().float().cpu()
        index = locate(sigma, schedule) if schedule is not None else None
        total = int(schedule.numel()) - 1 if schedule is not None else None
        timestep = float(self.model_sampling.timestep(sigmas.flatten()[:1].float().to(
            self.model_sampling.sigmas.device if hasattr(self.model_sampling, "sigmas") else sigmas.device)))
        info = StepInfo(index=index, total=total, sigma=sigma, timestep=timestep)
        self._step_cache = (sigmas, info)
        self._observe(sigmas, info, extra_options)
        return info

    def _observe(self, sigmas, info: StepInfo, extra_options):
        """Run boundaries: the editors see each sampling call once (a reference pass is not a sampling call)."""
        if extra_options.get(REFERENCE_PASS_KEY) or self._observed is sigmas:
            return
        self._observed = sigmas
        for e in self.editors:
            e.observe_call(info, self)

    def context(self, kind, q, extra_options) -> Optional[CallContext]:
        layer = self.layer_of(extra_options)
        if layer is None:
            return None
        shape = extra_options.get("original_shape")  # [B, C, H, W] of the latent
        h, w = layer.grid(int(shape[2]), int(shape[3])) if shape is not None else (q.shape[1], 1)
        cond_or_uncond = extra_options.get("cond_or_uncond") or [0]
        return CallContext(kind=kind, layer=layer, step=self.step_of(extra_options), cond_or_uncond=cond_or_uncond,
                           rows_per_chunk=max(1, q.shape[0] // len(cond_or_uncond)), grid=(h, w),
                           heads=int(extra_options.get("n_heads", layer.heads)), extra_options=extra_options,
                           reference_pass=extra_options.get(REFERENCE_PASS_KEY))

    def __call__(self, kind, q, k, v, extra_options, fallback):
        """Run the active editors; ``fallback(q, k, v)`` is the attention that would have run without us."""
        ctx = self.context(kind, q, extra_options)
        if ctx is None:
            return fallback(q, k, v)
        if ctx.reference_pass is not None:
            ctx.reference_pass.record(ctx, q, k, v)
            return fallback(q, k, v)
        active = [e for e in self.editors if e.active(ctx)]
        if not active:
            return fallback(q, k, v)
        ctx.kernel = fallback
        for e in active:
            q, k, v = e.edit_qkv(q, k, v, ctx)
        out = None
        for e in active:
            out = e.attend(q, k, v, ctx)
            if out is not None:
                break
        if out is None:
            if any(e.needs_probs(ctx) for e in active):
                probs = attention_probs(q, k, ctx.heads)
                for e in active:
                    probs = e.edit_probs(probs, ctx)
                out = apply_probs(probs, v, ctx.heads)
            else:
                out = ctx.kernel(q, k, v)
        for e in active:
            out = e.edit_out(out, ctx)
        return out
