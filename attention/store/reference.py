"""Self-attention keys/values (and cross-attention maps) of a real image along its inversion chain.

At step i the reference image's K/V are the projections of its chain latent ``inversion.chain[i]`` run through the
UNet with the inversion's own conditioning. Two ways to have them:
- ``cache``: one reference pass per INVERSION (one UNet call per needed step, batch 1) stores them, fp16, on the
  GPU or offloaded to CPU; every later run (new seeds!) reuses them at no UNet cost.
- ``recompute``: a UNet function wrapper runs the reference forward next to every sampling call (no storage).
``auto`` caches where it fits and falls back to recompute with a warning where it would not.

What a cache keeps (``keep``): ``inputs`` (default) the self-attention's input hidden states (the block's normalised
``n``, what to_k and to_v read: one tensor of ``channels`` per token), projected with the layer's own to_k / to_v
when used, half the bytes of ``kv`` (K and V as projected). Same math: the projection of the stored input is what
the UNet computes, so the two differ by the storage dtype's rounding only (bit-identical with float32 storage up to
matmul order; tests/test_reference_store.py). Recompute mode keeps K and V (one step at a time; no re-projection).

Ownership: every cache lives in the one process-wide ``STORE`` (KV Inject and RIVAL alike), keyed by what the
K/V depend on (the MODEL's identity, the inversion's fingerprint, the conditioning's fingerprint, the layers and
steps recorded). Its lifetime is explicit: an entry stays until the store needs its bytes for a newer one (least
recently used first), until ComfyUI frees memory (``/free``, or room for a model on the GPU: store_memory.py)
or until ``STORE.clear()`` (the Free Inversion Chain Caches node). The store never holds
more than its budget: a fraction of the memory free on the storage device (headroom for sampling and decoding),
counting the bytes it already holds as free; what it holds counts every tensor an entry keeps alive, the
inversion's chain included.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Dict, Iterable, Optional, Sequence, Tuple

import psutil
import torch

from ... import compat
from ...artifacts import (Inversion, InversionChainError, digest, inversion_fingerprint, named_error, node_name,
                          user_text)
from ...model_info import model_identity
from ...conditioning import first_row
from ..core.controller import CallContext, attention_probs
from ..core.layers import AttentionLayer
from ..core.schedule import locate
from ..core import patching
from . import store_memory
from ...logs import log

POLICIES = ("auto", "gpu", "cpu", "recompute")
BUDGET_FRACTION = 0.4   # of the free memory of the storage device; the rest is headroom for sampling/decoding
KEEPS = ("inputs", "kv")


class ReferenceKV:
    """Recorder and store of one inversion's reference K/V for chosen (chain step, layer) pairs."""

    default_keep = "inputs"
    noun = "reference K/V"   # what the store's budget messages call this entry

    def __init__(self, inversion: Inversion, layers: Sequence[AttentionLayer], steps: Iterable[int],
                 storage_dtype=torch.float16, cross_tokens: Optional[Sequence[int]] = None, cross_level: int = 2,
                 branches: int = 1, keep: Optional[str] = None):
        self.inversion = inversion
        self.layer_ids = {l.index for l in layers}
        self.layers = list(layers)
        self.steps = sorted(set(int(s) for s in steps))
        self.storage_dtype = storage_dtype
        # (step, layer, branch) -> (K, V) | (input,) | (input of to_k, input of to_v) when another patch split them
        self.store: Dict[Tuple[int, int, int], Tuple[torch.Tensor, ...]] = {}
        self.keep = keep or self.default_keep
        if self.keep not in KEEPS:
            raise ValueError(f"keep must be one of {KEEPS}, got {self.keep!r}")
        self._attn: Dict[int, "weakref.ref"] = {}   # layer index -> its attn1 module (inputs: to_k / to_v)
        self.eps: Dict[int, torch.Tensor] = {}  # step -> the reference's conditional noise prediction
        self.cross_tokens = list(cross_tokens or [])
        self.cross_level = cross_level
        self.cross_maps: Dict[int, torch.Tensor] = {}   # step -> (tokens, h, w) mean over heads and layers
        self._cross_count: Dict[int, int] = {}
        self.storage_device = torch.device("cpu")
        self.mode = "cache"
        self.conds = None           # model-ready conditioning of the inversion (recompute mode)
        self.conds_uncond = None    # and of the negative prompt (recompute mode, two branches)
        self.recompute_conds = None  # a partial entry: (conds, conds_uncond) for the steps it does not hold
        self.branches = int(branches)   # CFG branches recorded: 1 (conditional) or 2 (with a negative prompt)
        self.node = node_name()

    def with_steps(self, steps: Iterable[int]) -> "ReferenceKV":
        """An empty entry like this one for other chain steps."""
        entry = ReferenceKV(self.inversion, self.layers, steps, self.storage_dtype, self.cross_tokens,
                            self.cross_level, self.branches, self.keep)
        entry.node = self.node
        return entry

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def estimate_bytes(self) -> int:
        """What ``fill`` stores: the self-attention inputs (or K and V) of every recorded branch, layer and step
        (storage dtype), the reference's conditional eps per step (float32) and, in masked mode, the word maps per
        step (float32)."""
        c, h, w = self.inversion.latent_shape[-3:]
        tensors = 1 if self.keep == "inputs" else 2
        per_step = 0
        for layer in self.layers:
            gh, gw = layer.grid(h, w)
            per_step += tensors * gh * gw * layer.channels
        itemsize = torch.tensor([], dtype=self.storage_dtype).element_size()
        total = per_step * self.branches * len(self.steps) * itemsize
        total += len(self.steps) * c * h * w * 4
        if self.cross_tokens:
            gh, gw = ((h + 2 ** self.cross_level - 1) // 2 ** self.cross_level,
                      (w + 2 ** self.cross_level - 1) // 2 ** self.cross_level)
            total += len(self.steps) * len(self.cross_tokens) * gh * gw * 4
        return total

    def nbytes(self) -> int:
        """Bytes really held: inputs or K/V, eps and word maps."""
        tensors = ([t for kv in self.store.values() for t in kv] + list(self.eps.values())
                   + list(self.cross_maps.values()))
        return sum(t.numel() * t.element_size() for t in tensors)

    # -- recording (called by the Controller during a reference pass) ----------------------------------------
    def record(self, ctx: CallContext, q, k, v):
        i = ctx.step.index
        if i is None or ctx.step.total != self.inversion.steps or i not in self.steps:
            return
        if ctx.kind == "self" and ctx.layer.index in self.layer_ids:
            if self.keep == "inputs":
                return   # record_inputs has them (before the projections)
            for chunk, branch in enumerate(ctx.cond_or_uncond):  # 0 = cond, 1 = uncond; row 0 of each chunk
                row = chunk * ctx.rows_per_chunk
                self.store[(i, ctx.layer.index, int(branch))] = (
                    k[row:row + 1].detach().to(self.storage_device, self.storage_dtype),
                    v[row:row + 1].detach().to(self.storage_device, self.storage_dtype))
        elif (ctx.kind == "cross" and self.cross_tokens and ctx.layer.level == self.cross_level
              and 0 in ctx.cond_or_uncond):   # the conditional branch's maps (the source prompt's words)
            row = list(ctx.cond_or_uncond).index(0) * ctx.rows_per_chunk
            probs = attention_probs(q[row:row + 1], k[row:row + 1], ctx.heads)[0].mean(0)  # (Nq, 77)
            maps = probs[:, self.cross_tokens].T.reshape(len(self.cross_tokens), *ctx.grid).float().cpu()
            n = self._cross_count.get(i, 0)
            self.cross_maps[i] = maps if n == 0 else self.cross_maps[i] * (n / (n + 1)) + maps / (n + 1)
            self._cross_count[i] = n + 1

    def record_inputs(self, ctx: CallContext, key_input, value_input):
        """inputs mode: keep row 0 of every chunk of what to_k and to_v read (one tensor when they read the same)."""
        i = ctx.step.index
        if (self.keep != "inputs" or i is None or ctx.step.total != self.inversion.steps or i not in self.steps
                or ctx.layer.index not in self.layer_ids):
            return
        for chunk, branch in enumerate(ctx.cond_or_uncond):
            row = chunk * ctx.rows_per_chunk
            kept = [key_input] if value_input is key_input else [key_input, value_input]
            self.store[(i, ctx.layer.index, int(branch))] = tuple(
                t[row:row + 1].detach().to(self.storage_device, self.storage_dtype) for t in kept)

    def usable(self) -> bool:
        """False once the model whose projections an inputs cache needs is gone (the entry is then refilled)."""
        return self.keep != "inputs" or all(ref() is not None for ref in self._attn.values())

    def get(self, step: int, layer: AttentionLayer, device, dtype,
            branch: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        kept = self.store.get((step, layer.index, branch))
        if kept is None:
            raise named_error(
                f"{self.node}: no reference keys/values for step {step}, layer {layer.index}. If another node set a "
                f"UNet function wrapper after {self.node}, put {self.node} after it or use cache mode.")
        if self.keep == "kv":
            return kept[0].to(device, dtype), kept[1].to(device, dtype)
        ref = self._attn.get(layer.index)
        attn = ref() if ref is not None else None
        if attn is None:
            raise named_error(f"{self.node}: the model the reference was recorded with is no longer loaded; "
                                      f"run the node again.")
        with torch.no_grad():
            key_input = kept[0].to(device, dtype)
            value_input = kept[1].to(device, dtype) if len(kept) == 2 else key_input
            return attn.to_k(key_input), attn.to_v(value_input)

    # -- filling ---------------------------------------------------------------------------------------------
    def fill(self, model, latent_image, negative=None):
        """Cache mode: one reference pass over the needed steps (batch 1, the inversion's conditioning). With a
        ``negative`` both CFG branches are recorded, and the reference's conditional noise prediction too."""
        inv = self.inversion
        if self.keep == "inputs":
            self._attn = {i: weakref.ref(m) for i, m in patching.self_attention_projections(model, self.layers).items()}
        recorder_model = patching.with_reference_pass(model, self, inputs=self.keep == "inputs")
        eps = self.eps

        def observe(args):
            sigma = args["sigma"].flatten()[:1]
            i = locate(float(sigma), inv.sigmas)
            if i is not None:
                eps[i] = ((args["input"][:1] - args["cond_denoised"][:1]) / sigma.view(1, 1, 1, 1)).to(
                    self.storage_device, torch.float32)
            return args["denoised"]

        patching.add_post_cfg_function(recorder_model, observe)
        replay_chain(recorder_model, inv, self.steps, latent_image, negative)

    def recompute_wrapper(self, previous):
        """UNet function wrapper for recompute mode: a reference forward before each sampling call."""
        self.keep = "kv"   # one step held at a time: nothing to save, and no second projection
        self.store.clear()

        def wrapper(apply_model, args):
            t = args["timestep"]
            i = locate(float(t.flatten()[0]), self.inversion.sigmas)
            if i is not None and i in self.steps and not any(key[0] == i for key in self.store):
                self.store.clear()
                x = args["input"]
                x_ref = self.inversion.latent_at(i, x.device, x.dtype)[:1]
                self.eps.clear()
                made = list((self.conds, self.conds_uncond)[:self.branches])
                both = patching.stack_conds(made) if len(made) == 2 else None
                # both CFG branches in one forward where their conds share a batch (one call, not two)
                calls = [([0, 1], both)] if both is not None else list(enumerate(made))
                options = args["c"].get("transformer_options", {})
                for branch, conds in calls:
                    rows = len(branch) if isinstance(branch, list) else 1
                    conds = {k: (v.to(x.device) if torch.is_tensor(v) else v) for k, v in conds.items()}
                    denoised = patching.reference_call(apply_model, x_ref.repeat(rows, 1, 1, 1),
                                                       t[:1].repeat(rows), conds, options, self, branch)
                    if branch in (0, [0, 1]):   # the reference's conditional noise prediction (RIVAL's normalisation)
                        self.eps[i] = ((x_ref - denoised[:1]) / t[:1].view(1, 1, 1, 1)).float()
            return patching.call_unet(apply_model, args, previous)
        return wrapper


class ReferenceStore:
    """The one owner of cached reference K/V: entries keyed by what they depend on, least recently used evicted
    first so that the bytes held never exceed the budget."""

    def __init__(self):
        self.entries: "OrderedDict[tuple, ReferenceKV]" = OrderedDict()
        self.max_bytes: Optional[int] = None   # fixed budget (tests, users with known headroom); None = fraction

    def held_bytes(self, device=None) -> int:
        """Every byte the entries keep alive (recorded tensors, the inversions and conditioning they hold), each
        tensor once, on ``device``'s type when given."""
        return store_memory.held_bytes(self.entries.values(), device)

    def budget(self, device) -> int:
        """Bytes the store may hold on ``device``: ``max_bytes`` if set, else BUDGET_FRACTION of what is free
        there, counting the store's own entries as free (they can be evicted)."""
        if self.max_bytes is not None:
            return int(self.max_bytes)
        device = torch.device(device)
        if device.type == "cpu":
            free = psutil.virtual_memory().available
        else:
            free = compat.free_memory(device)
        return int(BUDGET_FRACTION * (free + self.held_bytes(device)))

    @staticmethod
    def key(kind: str, model, inversion: Inversion, conditioning_fingerprint: str, layers: Sequence[AttentionLayer],
            steps: Iterable[int], extra: tuple = ()) -> tuple:
        """Everything the stored K/V depend on: the MODEL that records them (weights by content, its LoRAs and
        other patches with their strengths, see ``model_identity``), the inversion (its chain by content), the
        conditioning, the layers and steps, and the caller's extras (one content digest of them all)."""
        return (kind, digest(kind, model_identity(model), inversion_fingerprint(inversion), conditioning_fingerprint,
                             [l.index for l in layers], sorted(set(int(s) for s in steps)), list(extra)))

    def get(self, key) -> Optional[ReferenceKV]:
        ref = self.entries.get(key)
        if ref is not None:
            self.entries.move_to_end(key)
        return ref

    def drop_unusable(self) -> int:
        """Drop the entries that can no longer serve (an inputs cache whose model is gone); returns their bytes."""
        dead = [k for k, e in self.entries.items() if not e.usable()]
        freed = store_memory.held_bytes([self.entries[k] for k in dead]) if dead else 0
        for key in dead:
            self.entries.pop(key)
        return freed

    def make_room(self, need: int, device):
        """Evict least recently used entries on ``device`` until ``need`` more bytes fit the budget (entries that
        can no longer serve go first)."""
        self.drop_unusable()
        device = torch.device(device)
        budget = self.budget(device)
        for key in list(self.entries):
            if self.held_bytes(device) + need <= budget:
                break
            if self.entries[key].storage_device.type == device.type:
                evicted = self.entries.pop(key)
                log.info("[Inversion Chain] reference K/V cache: evicted %.1f MB (%s) for a newer entry",
                         evicted.nbytes() / 2 ** 20, key[0])

    def put(self, key, ref: ReferenceKV):
        self.drop_unusable()
        self.entries[key] = ref
        self.entries.move_to_end(key)

    def clear(self):
        self.entries.clear()


STORE = ReferenceStore()
compat.on_memory_release(lambda reason, device, need: store_memory.release(STORE, reason, device, need))


def replay_chain(recorder_model, inv: Inversion, steps: Sequence[int], latent_image, negative=None):
    """Run ``recorder_model`` (a reference-pass clone) once on the chain's latent of each of ``steps`` (batch 1,
    the inversion's positive; with a ``negative`` the uncond branch too), through ComfyUI's sampling entry so
    that every model wrapper and patch sees an ordinary call."""
    pbar = compat.progress_bar(len(steps))

    def reference_pass(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        for i in steps:
            compat.check_interrupt()
            x_i = inv.latent_at(i, x.device, x.dtype)[:1]
            model_k(x_i, x_i.new_ones([1]) * float(inv.sigmas[i]), **(extra_args or {}))
            pbar.update(1)
        return x

    positive = first_row(inv.positive)
    # any cfg != 1 makes ComfyUI evaluate the uncond branch; the guided result itself is not used
    compat.sample_with_function(recorder_model, reference_pass, inv.sigmas, positive,
                                negative if negative is not None else positive,
                                1.0 if negative is None else 2.0, latent_image[:1])


def choose_storage(entry, policy: str, model) -> str:
    """Pick a store entry's cache device within the store's budget, or recompute (never risk running out of
    memory). ``entry`` is any store entry (reference K/V, content features): it has ``node``, ``noun``,
    ``estimate_bytes()`` and receives ``storage_device`` / ``budget_message``."""
    if policy not in POLICIES:
        raise InversionChainError(f"unknown cache policy '{user_text(policy)}'; use one of "
                                  f"{', '.join(POLICIES)}.")
    if policy == "recompute":
        return "recompute"
    need = entry.estimate_bytes()
    gpu = model.load_device
    candidates = {"auto": [gpu, torch.device("cpu")], "gpu": [gpu, torch.device("cpu")],
                  "cpu": [torch.device("cpu")]}[policy]
    budgets = []
    for device in candidates:
        if device.type == "cpu" and budgets and budgets[-1][0].type == "cpu":
            continue
        budget = STORE.budget(device)
        budgets.append((device, budget))
        if need <= budget:
            if policy == "gpu" and device.type == "cpu":
                log.warning("[Inversion Chain] %s: %s (%.1f MB) do not fit the budget on %s; keeping them in CPU "
                            "memory", entry.node, entry.noun, need / 2 ** 20, gpu)
            entry.storage_device = device
            return "cache"
    said = ", ".join(f"{budget / 2 ** 20:.1f} MB on {device}" for device, budget in budgets)
    rule = ("a fixed budget" if STORE.max_bytes is not None else
            f"{int(BUDGET_FRACTION * 100)}% of free memory, counting what the cache holds as free")
    log.warning("[Inversion Chain] %s: %s would need %.1f MB, over the cache budget (%s: %s); recomputing them at "
                "every step instead (slower, same result)", entry.node, entry.noun, need / 2 ** 20, said, rule)
    entry.budget_message = f"needs {need / 2 ** 20:.1f} MB, budget {said}"
    return "recompute"


def cached(kind: str, model, reference: ReferenceKV, conditioning_fingerprint: str, policy: str, fill,
           extra: tuple = ()) -> Tuple[ReferenceKV, str]:
    """The store's entry for ``reference``'s key, filled once by ``fill(reference)`` when the policy and budget
    allow; returns (the entry to use, "cache" | "recompute")."""
    key = ReferenceStore.key(kind, model, reference.inversion, conditioning_fingerprint, reference.layers,
                             reference.steps, tuple(extra) + (reference.keep,))
    found = STORE.get(key) if policy != "recompute" else None
    if found is not None and found.usable():
        return found, "cache"
    if found is not None:
        STORE.entries.pop(key, None)
    mode = choose_storage(reference, policy, model)
    if mode == "cache":
        STORE.make_room(reference.estimate_bytes(), reference.storage_device)
        fill(reference)
        STORE.put(key, reference)
    return reference, mode
