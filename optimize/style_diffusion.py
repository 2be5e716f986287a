"""StyleDiffusion (Li et al.): invert a real image into the value input of cross-attention, one mapper per step.

Mapper (per sampling step): the image's CLIP vision tokens ``(N, W)`` (after the final layer norm, no
projection) -> Conv1d N -> 2T (tokens as channels) -> [Linear W -> D when the vision width is not the model's
context width] -> Conv1d 2T -> 2T -> BatchNorm1d -> LeakyReLU -> Conv1d 2T -> 2T, split into T scale and T shift
rows; the value input is ``text * (1 + scale) + shift`` (T = prompt tokens, D = context width). Weights start at
N(0, 0.01) and biases at 0, so an untrained mapper is close to the prompt itself (this pack writes the FiLM as a
residual, ``1 + scale``, for that reason); each step's mapper starts from the previous step's.

Training (per image), at guidance ``cfg`` with the unconditional prompt: from the noisiest step down, Adam
(beta1 0, beta2 0.999), lr ``learning_rate * (1 - i/100)`` (floored at 1%), at most ``ceil(inner_steps *
e^(-0.1 i))`` iterations at step i, stopping early (as null-text) once the loss is below ``1e-5 + i * 2e-5``;
loss = MSE of the DDPM latent after the guided step against the inversion's + ``attention_loss_weight`` x MSE of
the conditional branch's latent/4 cross-attention maps against the inversion's (the maps of the chain latent at
that step with the prompt's own values). A step keeps the best weights it measured (the last update's included:
Adam's first sign-like updates can overshoot, and its loss would then end above where it started). After its
iterations a step's BatchNorm statistics are set to the exact
statistics of its input under the final weights and the mapper runs in eval mode (the official code never leaves
train mode); with this single fixed input eval and train outputs agree, so what was optimised is what is used.
The latent then advances with that value input, so later steps correct earlier drift.

Cache: the result is keyed by the image, the inversion, the model, both prompts, the CLIP vision weights and
every setting; kept in memory (up to MEMORY_BYTES) and on disk in the pack's user folder.
"""
from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from collections import OrderedDict
from typing import List, Optional

import torch
import torch.nn.functional as F

from .. import compat
from ..artifacts import (Inversion, InversionChainError, Style, digest, inversion_fingerprint, module_digest,
                         node_name)
from ..conditioning import SIZE_KEYS
from ..attention.core import patching
from ..attention.core.schedule import Schedule
from ..attention.editors.style import CrossAttentionRecorder, recorder_level, value_injection
from ..model_info import model_identity, model_key, require_single_cfg1_inversion, unet_of
from ..samplers import ddim
from .training import ChainStep, chain_error, forward_hooks, minimise, normal, text_conds, trainable_weights, walk_chain
from ..logs import log


TECHNIQUE = "StyleDiffusion"   # the name in log lines written outside a node
INIT_STD = 0.01
INIT_SEED = 0
LATENT_FACTOR = 8          # SD-family VAEs: image pixels per latent cell
CACHE_VERSION = 3
_memory: "OrderedDict[str, Style]" = OrderedDict()


class ValueMapper(torch.nn.Module):
    """One step's mapper: image tokens (1, N, W) -> value input (1, T, D) for the text embedding (1, T, D)."""

    def __init__(self, image_tokens: int, image_width: int, text_tokens: int, context_dim: int):
        super().__init__()
        hidden = 2 * text_tokens
        self.text_tokens = text_tokens
        self.token_mix = torch.nn.Conv1d(image_tokens, hidden, 1)
        self.width = torch.nn.Linear(image_width, context_dim) if image_width != context_dim else torch.nn.Identity()
        self.mix = torch.nn.Conv1d(hidden, hidden, 1)
        self.norm = torch.nn.BatchNorm1d(hidden)
        self.act = torch.nn.LeakyReLU()
        self.out = torch.nn.Conv1d(hidden, hidden, 1)
        generator = torch.Generator().manual_seed(INIT_SEED)  # same image + settings -> same result (and cache)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (torch.nn.Conv1d, torch.nn.Linear)):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * INIT_STD)
                    m.bias.zero_()

    def forward(self, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h = self.width(self.token_mix(tokens))
        h = self.out(self.act(self.norm(self.mix(h))))
        scale, shift = h[:, :self.text_tokens], h[:, self.text_tokens:]
        return text * (1 + scale) + shift

    @torch.no_grad()
    def calibrate(self, tokens: torch.Tensor):
        """Set BatchNorm's running statistics to the exact (biased) statistics of this input's batch, so eval mode
        computes what train mode computed."""
        h = self.mix(self.width(self.token_mix(tokens)))
        self.norm.running_mean.copy_(h.mean(dim=(0, 2)))
        self.norm.running_var.copy_(h.var(dim=(0, 2), unbiased=False))


def inner_iterations(inner_steps: int, i: int, decay: bool = True) -> int:
    return max(1, math.ceil(inner_steps * math.exp(-0.1 * i))) if decay else inner_steps


def image_tokens(clip_vision, image) -> torch.Tensor:
    if not hasattr(clip_vision, "encode_image"):
        raise InversionChainError(f"`clip_vision` must be a CLIP_VISION from Load CLIP Vision, got "
                                  f"{type(clip_vision).__name__}.")
    tokens = compat.clip_vision_tokens(clip_vision, image)
    if not torch.is_tensor(tokens) or tokens.ndim != 3 or tokens.shape[1] < 2 or tokens.shape[0] != image.shape[0]:
        shape = tuple(tokens.shape) if torch.is_tensor(tokens) else type(tokens).__name__
        raise InversionChainError(
            f"this CLIP_VISION's output {shape} is not a sequence of image tokens (batch, tokens, width); "
            f"the mapper needs a ViT image encoder (CLIP ViT-B/16: 197x768, ViT-L/14: 257x1024, ViT-H/14: "
            f"257x1280).")
    if not torch.isfinite(tokens).all():
        raise InversionChainError("the CLIP_VISION produced non-finite features for this image.")
    return tokens.float()


def check_inputs(model, inversion: Inversion, image, cfg: float, inner_steps: int, learning_rate: float,
                 attention_loss_weight: float):
    require_single_cfg1_inversion(model, inversion, "StyleDiffusion")
    if not torch.is_tensor(image) or image.ndim != 4 or image.shape[-1] not in (3, 4):
        raise InversionChainError("`image` must be an IMAGE (batch, height, width, channels).")
    if image.shape[0] != 1:
        raise InversionChainError(f"`image` holds {image.shape[0]} images; connect the one image that was "
                                  f"inverted.")
    expected = tuple(s * LATENT_FACTOR for s in inversion.latent_shape[-2:])
    if tuple(image.shape[1:3]) != expected:
        raise InversionChainError(
            f"the image is {image.shape[2]}x{image.shape[1]} px but the INVERSION was made from a "
            f"{expected[1]}x{expected[0]} px image. Connect the image that was encoded and inverted.")
    if not math.isfinite(cfg) or cfg < 1.0:
        raise InversionChainError(f"cfg must be 1 or more (the guidance you will sample with), got {cfg}.")
    if inner_steps < 1:
        raise InversionChainError(f"inner_steps must be at least 1, got {inner_steps}.")
    if not math.isfinite(learning_rate) or learning_rate <= 0:
        raise InversionChainError(f"learning_rate must be a positive number, got {learning_rate}.")
    if not math.isfinite(attention_loss_weight) or attention_loss_weight < 0:
        raise InversionChainError(f"attention_loss_weight must be 0 or more, got {attention_loss_weight}.")


# -- cache --------------------------------------------------------------------------------------------------------
def _vision_fingerprint(clip_vision) -> str:
    """Content hash of the CLIP vision tower's weights (computed once per loaded tower, remembered on it)."""
    module = getattr(clip_vision, "model", None)
    return module_digest(module) if isinstance(module, torch.nn.Module) else f"{type(clip_vision).__qualname__}"


def _conditioning_tensors(conditioning) -> list:
    # per entry: the hidden states, every tensor entry by name and the SDXL size entries (a different width/height
    # conditions the model differently)
    return [[c[0], {k: v for k, v in c[1].items() if torch.is_tensor(v)}, {k: c[1][k] for k in SIZE_KEYS if k in c[1]}]
            for c in conditioning]


def cache_key(image, inversion, positive, negative, clip_vision, settings: dict, model=None) -> str:
    """Everything the trained values depend on, each item length-delimited: the image, the inversion (its chain by
    content), the MODEL that trains (weights by content, its LoRAs and patches with their strengths), both prompts,
    the CLIP vision weights and every setting."""
    return digest(CACHE_VERSION, image, inversion_fingerprint(inversion),
                  model_identity(model) if model is not None else None, positive, negative,
                  _vision_fingerprint(clip_vision), settings)[:32]


DISK_CACHE_BYTES = 2 * 2 ** 30  # oldest-used files are evicted beyond this (a STYLE's size: docs/memory.md)
TMP_SUFFIX = ".tmp"
STALE_TMP_SECONDS = 3600   # a temp file this old is a write that never finished (a crash, a killed server)


def cache_dir() -> str:
    """The STYLE disk cache: ``<user directory>/__inversion_chain/style_cache`` (``compat.persistent_directory``),
    outside ComfyUI's temp folder, so it survives restarts; the Free Inversion Chain Caches node (disk_cache) or
    deleting the folder clears it."""
    return compat.persistent_directory("style_cache")


def sweep_stale_temp_files(folder: Optional[str] = None, older_than: float = STALE_TMP_SECONDS) -> int:
    """Delete unfinished writes (``*.tmp``) older than ``older_than`` seconds; returns how many went. A write in
    progress by another server sharing the folder is younger and stays."""
    folder = cache_dir() if folder is None else folder
    removed = 0
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    now = time.time()
    for name in names:
        path = os.path.join(folder, name)
        try:
            if name.endswith(TMP_SUFFIX) and os.path.isfile(path) and now - os.stat(path).st_mtime > older_than:
                os.remove(path)
                removed += 1
        except OSError:
            pass
    if removed:
        log.info("[Inversion Chain] %s: removed %d unfinished cache write(s) from %s", TECHNIQUE, removed, folder)
    return removed


def _evict(keep: str, budget: Optional[int] = None):
    """Delete the least recently used cache files until the folder fits ``budget`` bytes (``keep`` stays)."""
    budget = DISK_CACHE_BYTES if budget is None else budget
    folder = cache_dir()
    files = []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        try:
            if name.endswith(".pt") and os.path.isfile(path):
                st = os.stat(path)
                files.append((st.st_mtime, st.st_size, path))
        except OSError:   # another server removed it meanwhile
            pass
    total = sum(size for _, size, _ in files)
    for _, size, path in sorted(files):
        if total <= budget:
            break
        if os.path.basename(path) == f"{keep}.pt":
            continue
        try:
            os.remove(path)
            total -= size
            log.info("[Inversion Chain] %s: evicted %s from the disk cache", TECHNIQUE, path)
        except OSError:
            pass


MEMORY_BYTES = 256 * 2 ** 20   # the in-memory cache's budget (least recently used STYLEs go first)


def style_bytes(style: Style) -> int:
    """Bytes a cached STYLE holds: its values and every other tensor it keeps (conditioning, sigmas, counters)."""
    seen, total = set(), 0
    stack = [style.values, style.positive, style.negative, style.sigmas, style.inner_iters]
    while stack:
        v = stack.pop()
        if torch.is_tensor(v):
            if id(v) not in seen:   # a tensor held twice counts once
                seen.add(id(v))
                total += v.numel() * v.element_size()
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
    return total + 8 * sum(len(x) for x in style.losses)


def memory_bytes() -> int:
    return sum(style_bytes(s) for s in _memory.values())


def _remember(style: Style):
    _memory[style.cache_key] = style
    _memory.move_to_end(style.cache_key)
    while len(_memory) > 1 and memory_bytes() > MEMORY_BYTES:
        _memory.popitem(last=False)
    if memory_bytes() > MEMORY_BYTES:   # one STYLE over the whole budget is not kept in memory
        _memory.pop(style.cache_key, None)


TRAINED_FIELDS = ("values", "losses", "latent_losses", "inner_iters", "final_error", "seconds", "settings")


def load_cached(key: str, context: dict) -> Optional[Style]:
    """The cached result for ``key``, or None. ``context``: the Style fields that come from the inputs (equal
    inputs give equal keys, so only the trained fields are stored: plain tensors and numbers, no pack classes)."""
    if key in _memory:
        _memory.move_to_end(key)
        style = copy.copy(_memory[key])
        style.from_cache = "memory"
        return style
    path = os.path.join(cache_dir(), f"{key}.pt")
    if not os.path.isfile(path):
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        style = Style(**{k: data[k] for k in TRAINED_FIELDS}, **context, cache_key=key)
    except Exception as e:  # a damaged or older file is retrained, not fatal
        log.warning("[Inversion Chain] %s: ignoring unreadable cache file %s (%s)", TECHNIQUE, path, e)
        return None
    try:
        os.utime(path)  # most recently used: evicted last
    except OSError:
        pass
    _remember(style)
    style = copy.copy(style)
    style.from_cache = "disk"
    return style


_swept = set()   # cache folders swept of stale temp files in this process


def store(style: Style):
    _remember(style)
    tmp = None
    try:
        folder = cache_dir()
        os.makedirs(folder, exist_ok=True)
        if folder not in _swept:
            _swept.add(folder)
            sweep_stale_temp_files(folder)
        path = os.path.join(folder, f"{style.cache_key}.pt")
        # a unique name per write in the same folder: two servers sharing the folder never write the same file
        fd, tmp = tempfile.mkstemp(prefix=f"{style.cache_key}.", suffix=TMP_SUFFIX, dir=folder)
        os.close(fd)
        torch.save({k: getattr(style, k) for k in TRAINED_FIELDS}, tmp)
        os.replace(tmp, path)
        tmp = None
        _evict(style.cache_key)
    except (OSError, RuntimeError) as e:  # full disk (torch.save raises RuntimeError), read-only folder: the
        # result is returned and kept in memory; only the disk copy is missing
        log.warning("[Inversion Chain] %s: could not write the disk cache (%s); the result is kept in memory only",
                    TECHNIQUE, e)
    finally:
        if tmp is not None:
            try:
                os.remove(tmp)
            except OSError:
                pass


def clear_memory_cache():
    _memory.clear()


def clear_disk_cache() -> int:
    """Delete every cached STYLE file (and unfinished writes); returns how many files went."""
    removed = 0
    try:
        names = os.listdir(cache_dir())
    except OSError:
        return 0
    for name in names:
        if name.endswith(".pt") or name.endswith(TMP_SUFFIX):
            try:
                os.remove(os.path.join(cache_dir(), name))
                removed += 1
            except OSError:
                pass
    return removed


def _release(reason, device=None, memory_required=None):
    if reason == "unload_all":   # ComfyUI's /free: the disk copy stays, the memory copy goes
        clear_memory_cache()


compat.on_memory_release(_release)


# -- training -----------------------------------------------------------------------------------------------------
def train(model, clip_vision, image, inversion: Inversion, positive, negative, cfg: float = 7.5,
          inner_steps: int = 100, learning_rate: float = 1e-2, attention_loss_weight: float = 1.0,
          use_cache: bool = True, decay: bool = True) -> Style:
    check_inputs(model, inversion, image, cfg, inner_steps, learning_rate, attention_loss_weight)
    if negative is None:
        raise InversionChainError("connect `negative` (the unconditional prompt, usually empty).")
    tokens = image_tokens(clip_vision, image[..., :3])
    settings = {"inner_steps": int(inner_steps), "learning_rate": float(learning_rate), "cfg": float(cfg),
                "attention_loss_weight": float(attention_loss_weight), "decay": bool(decay),
                "image_tokens": int(tokens.shape[1]), "image_width": int(tokens.shape[2])}
    key = cache_key(image, inversion, _conditioning_tensors(positive), _conditioning_tensors(negative), clip_vision,
                    settings, model)
    context = dict(positive=positive, negative=negative, cfg=float(cfg), sigmas=inversion.sigmas.clone(),
                   scheduler=inversion.scheduler, inversion_fingerprint=inversion_fingerprint(inversion),
                   model_key=model_key(model))
    if use_cache:
        cached = load_cached(key, context)
        if cached is not None:
            log.info("[Inversion Chain] %s: loaded the trained mappers' values from the %s cache (key %s); no "
                     "training.", node_name(), cached.from_cache, key)
            return cached

    started = time.perf_counter()
    conds_c, conds_u = text_conds(model, positive, negative, inversion.latent_shape, "StyleDiffusion")
    steps, sigmas = inversion.steps, inversion.sigmas
    schedule = Schedule(sigmas, inversion.scheduler)
    recorder = CrossAttentionRecorder(recorder_level(), sigmas)
    injection = value_injection(None, schedule)
    patched = patching.add_attn2_patch(patching.install(model, recorder), injection)
    compat.load_models([patched])
    device = patched.load_device
    plan = [inner_iterations(inner_steps, i, decay) for i in range(steps)]
    pbar = compat.progress_bar(sum(plan))
    values: List[torch.Tensor] = []
    losses: List[List[float]] = []
    latent_losses: List[float] = []
    iters = [0] * steps

    call = compat.unet_caller(patched)

    def guided_step(x, s, s_next, d_cond, d_uncond):
        return ddim.guided_ddim_step(x, s, s_next, d_cond, d_uncond, cfg)

    def step_loss(c, d_uncond, target_maps):
        """(loss, its latent part, the guided next latent) with the injected value set by the caller."""
        d_cond = call(c.x, c.sigma, conds_c, 0)
        maps = recorder.take()
        x_next = guided_step(c.x, c.s, c.s_next, d_cond, d_uncond)
        loss_latent = F.mse_loss(ddim.z_from_x(x_next, c.s_next), c.target)
        return loss_latent + attention_loss_weight * F.mse_loss(maps, target_maps), loss_latent, x_next

    def finish(mapper, c, d_uncond, target_maps):
        """The mapper as it will be used (BatchNorm calibrated, eval mode): its value, loss, latent loss and the
        next latent."""
        mapper.calibrate(tokens_n)
        mapper.eval()
        value = injection.override = mapper(tokens_n, text).detach()
        loss, loss_latent, x_next = step_loss(c, d_uncond, target_maps)
        injection.override = None
        mapper.train()
        return value, loss, loss_latent, x_next

    try:
        with torch.inference_mode(False), trainable_weights(unet_of(model)):
            conds_c = {k: normal(v) for k, v in conds_c.items()}
            conds_u = {k: normal(v) for k, v in conds_u.items()}
            text = conds_c["c_crossattn"].to(device).float()
            tokens_n = normal(tokens).to(device)
            mapper = ValueMapper(tokens_n.shape[1], tokens_n.shape[2], text.shape[1], text.shape[2]).to(device)

            def step(c: ChainStep) -> torch.Tensor:
                with torch.no_grad():
                    d_uncond = call(c.x, c.sigma, conds_u, 1)
                    recorder.enabled = True
                    call(inversion.latent_at(c.i, device, torch.float32).clone(), c.sigma, conds_c, 0)
                    target_maps = recorder.take()
                mapper.train()
                optimizer = torch.optim.Adam(mapper.parameters(), lr=learning_rate * c.lr_scale, betas=(0.0, 0.999))
                best = {"loss": float("inf"), "state": None}

                def loss_fn():
                    with torch.enable_grad(), forward_hooks():
                        injection.override = mapper(tokens_n, text)
                        loss, _, _ = step_loss(c, d_uncond, target_maps)
                    injection.override = None
                    return loss

                def keep_best(value):
                    if value < best["loss"]:
                        best["loss"], best["state"] = value, copy.deepcopy(mapper.state_dict())

                # below the threshold the weights are good enough: kept, no further update
                step_losses, updated = minimise(loss_fn, optimizer, plan[c.i], c.threshold, pbar,
                                                update_below_threshold=False, on_loss=keep_best)
                iters[c.i] = len(step_losses)
                # Adam's first, sign-like updates can overshoot (the loss rises): the step keeps the best weights it
                # measured, the last update's included, so it never ends worse than it started
                with torch.no_grad():
                    value, loss, loss_latent, x_next = finish(mapper, c, d_uncond, target_maps)
                    if updated:   # the last update's weights: measured here for the first time
                        step_losses.append(float(loss))
                    if updated and float(loss) > best["loss"]:
                        mapper.load_state_dict(best["state"])
                        value, loss, loss_latent, x_next = finish(mapper, c, d_uncond, target_maps)
                values.append(value.float().cpu().clone())
                losses.append(step_losses)
                latent_losses.append(float(loss_latent))
                return x_next

            final_error = chain_error(patched, walk_chain(inversion, device, step), inversion, device)
    finally:
        injection.override = None
        recorder.enabled = False
        recorder.maps = []

    style = Style(values=torch.stack(values), **context, settings=settings, losses=losses,
                  latent_losses=latent_losses, inner_iters=torch.tensor(iters),
                  final_error=final_error, seconds=time.perf_counter() - started, cache_key=key)
    if use_cache:
        store(style)
        log.info("[Inversion Chain] %s: trained in %.1fs, cached (key %s) in memory and %s", node_name(), style.seconds,
                 key,
                 cache_dir())
    return style
