"""Data passed between the pack's nodes. Custom ComfyUI types are plain strings naming these classes."""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import html
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

INVERSION = "INVERSION"


class InversionChainError(ValueError):
    """A user-facing error: the message says what was wrong and what is accepted.

    Raised without a name in front: ``naming`` puts the display name of the node it concerns before the message,
    once (``named`` records that). The node contract names every error raised inside a node's function; a hook that
    runs later, inside a stock sampler, names its own with the node that made it (``node_name()`` at construction).
    """
    named = False


_NODE = contextvars.ContextVar("inversion_chain_node", default="Inversion Chain")


def node_name() -> str:
    """The display name of the pack node whose function is running ("Inversion Chain" outside any): what an object
    that acts later (an editor, a reference store entry, a NOISE) keeps to name its own errors and log lines."""
    return _NODE.get()


def named_error(message: str) -> InversionChainError:
    """An InversionChainError whose message already starts with the name of the node it concerns (``node_name()``
    kept by an object acting inside a stock sampler): ``naming`` leaves it as it is."""
    err = InversionChainError(message)
    err.named = True
    return err


@contextlib.contextmanager
def naming(name: str):
    """Inside: ``node_name()`` is ``name``, and an InversionChainError not yet named gets ``"name: "`` in front."""
    token = _NODE.set(name)
    try:
        yield
    except InversionChainError as err:
        if not err.named:
            err.args = (f"{name}: {err.args[0]}" if err.args else name,) + err.args[1:]
            err.named = True
        raise
    finally:
        _NODE.reset(token)


def user_text(value) -> str:
    """Workflow text (words, prompts, reprs of inputs) made safe to repeat in a message: ComfyUI's 2024-03 frontend
    shows an error's message as HTML (innerHTML), so ``&``, ``<`` and ``>`` are escaped; every message that repeats
    user text passes that text through here (quotes are left readable: the messages are element text, never an
    attribute)."""
    return html.escape(str(value), quote=False)


@dataclass(frozen=True)
class ModelKey:
    """Identity of the diffusion model an artefact was made with (architecture + a weight fingerprint)."""

    model_class: str
    prediction: str
    channels: int
    context_dim: int
    weight_fingerprint: Tuple[float, ...]

    def describe(self) -> str:
        return (f"{self.model_class} ({self.prediction}, {self.channels} channels, context {self.context_dim}, "
                f"weights {', '.join(f'{w:.4g}' for w in self.weight_fingerprint)})")


@dataclass
class Inversion:
    """A real image's DDIM inversion chain: every intermediate latent, with how it was made.

    Index ``i`` follows the *forward* (denoising) schedule: ``sigmas[i]`` descends from sigma_max to 0,
    ``chain[i]`` is the latent at ``sigmas[i]`` in ComfyUI's sampler space (``x0 + sigma * eps``, after the model's
    latent scaling), so ``chain[0]`` is x_T and ``chain[-1]`` the encoded image. ``chain`` lives on the model's
    offload device; ``latent_at`` brings one step where it is needed.

    A partial inversion (DDIM Invert's ``end_percent`` < 1) holds the last ``steps`` of a ``full_steps`` schedule:
    ``sigmas`` is that schedule from step ``start_step`` on, ``chain[0]`` the latent at that level, and every
    consumer sees a ``steps``-step run (what KSampler Advanced samples from ``start_at_step = start_step``).
    """

    sigmas: torch.Tensor            # [steps + 1], float32, CPU
    timesteps: torch.Tensor         # [steps + 1], the model's 0..999 timestep for each sigma (sigma 0 -> 0)
    chain: torch.Tensor             # [steps + 1, B, C, H, W]
    residuals: torch.Tensor         # [steps, B]: bound on each inversion step's round-trip error; NaN = not measured
    positive: list                  # CONDITIONING used while inverting
    negative: Optional[list]
    cfg: float
    scheduler: str
    refine_iters: int
    latent_shape: Tuple[int, ...]   # LATENT-space shape of the source batch [B, C, H, W]
    model_key: ModelKey
    unet_calls: int = 0
    step_calls: Optional[torch.Tensor] = None   # [steps] evaluations each step spent (forward order, like residuals)
    tolerance: float = 0.0                      # per-step residual bound the inversion stopped at (0: the cap only)
    extras: dict = field(default_factory=dict)  # room for later artefacts (e.g. attention maps of the inversion)
    full_steps: int = 0                         # steps of the whole schedule (0: = steps, a full inversion)

    @property
    def steps(self) -> int:
        return int(self.sigmas.shape[0]) - 1

    @property
    def start_step(self) -> int:
        """The whole schedule's step the chain starts at (0 for a full inversion)."""
        return max(0, self.full_steps - self.steps)

    @property
    def is_partial(self) -> bool:
        return self.start_step > 0

    def how_to_sample(self) -> str:
        """The stock wiring that samples this chain back (no noise added, sampler ddim)."""
        if not self.is_partial:
            return (f"{self.steps} steps, scheduler '{self.scheduler}', sampler 'ddim' (or DDIM Invert's `sigmas` into "
                    f"SamplerCustom)")
        return (f"DDIM Invert's `sigmas` into SamplerCustom, or KSampler Advanced with steps {self.full_steps}, "
                f"start_at_step {self.start_step}, scheduler '{self.scheduler}', sampler 'ddim', add_noise disable "
                f"(a partial inversion: the last {self.steps} of {self.full_steps} steps)")

    def latent_at(self, index: int, device=None, dtype=None) -> torch.Tensor:
        return self.chain[index].to(device=device, dtype=dtype)

    def check_matches(self, model_key: "ModelKey", latent_shape=None):
        """Raise a clear error when the inversion was made with another model or latent size."""
        if model_key != self.model_key:
            raise InversionChainError(
                f"the INVERSION was made with a different model.\n  inversion: {self.model_key.describe()}\n"
                f"  this model: {model_key.describe()}\nInvert the image again with the model you sample with.")
        if latent_shape is not None and tuple(latent_shape[-2:]) != tuple(self.latent_shape[-2:]):
            raise InversionChainError(
                f"the latent is {tuple(latent_shape[-2:])} (HxW) but the INVERSION was made at "
                f"{tuple(self.latent_shape[-2:])}. Use an image of the same size as the inverted one.")

    def summary(self) -> str:
        res = self.residuals[torch.isfinite(self.residuals)]
        worst = f"{float(res.max()):.3g}" if res.numel() else "not measured (refine_iters=0)"
        part = (f" (partial: the last {self.steps} of {self.full_steps}, from sigma {float(self.sigmas[0]):.4g}; "
                f"sample with {self.how_to_sample()})" if self.is_partial else "")
        return (f"INVERSION: {self.steps} steps ({self.scheduler}){part}, cfg {self.cfg}, at most {self.refine_iters} "
                f"refinements, tolerance {self.tolerance:g}, batch {self.latent_shape[0]}, latent "
                f"{tuple(self.latent_shape[1:])}, {self.unet_calls} model calls "
                f"({self.unet_calls / self.steps:.2f} per "
                f"step), worst step residual {worst}")


# -- null-text inversion ------------------------------------------------------------------------------------------
NULL_TEXT = "NULL_TEXT"


def inversion_fingerprint(inversion: "Inversion") -> tuple:
    """Identity of an INVERSION (model, schedule, size and a content hash of its whole chain and sigmas), to match
    artefacts made from it and to key caches built from it."""
    return (inversion.model_key, inversion.scheduler, inversion.steps, tuple(inversion.latent_shape),
            tensor_digest(inversion.sigmas), tensor_digest(inversion.chain))


# -- content digests (cache keys) ----------------------------------------------------------------------------------
DIGEST_DEPTH = 6   # how deep `feed` follows plain objects' attributes (beyond it: their class name only)
_MEMO = "_inversion_chain_digest"


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes. Remembered on the tensor (with its version counter where it has
    one), so a large tensor that several keys include (a LoRA's weights, an inversion's chain) is hashed once."""
    try:
        version = t._version
    except (RuntimeError, AttributeError):   # inference tensors keep no version counter
        version = None
    memo = getattr(t, _MEMO, None)
    if memo is not None and memo[0] == version:
        return memo[1]
    h = hashlib.sha256()
    flat = t.detach().reshape(-1)
    h.update(f"{flat.dtype}|{tuple(t.shape)}|".encode())
    chunk = 1 << 24   # elements per copy to the CPU
    for start in range(0, flat.numel(), chunk):
        part = flat[start:start + chunk].to("cpu").contiguous()
        h.update(part.view(torch.uint8).numpy().tobytes() if part.dtype != torch.bool else part.numpy().tobytes())
    out = h.hexdigest()
    try:
        setattr(t, _MEMO, (version, out))
    except (AttributeError, RuntimeError):
        pass
    return out


def _item(h, tag: bytes, payload: bytes):
    """One length-delimited item: tag, length, bytes (no two different sequences of items share a byte stream)."""
    h.update(tag + len(payload).to_bytes(8, "little") + payload)


def feed(h, value, depth: int = 0, seen: Optional[set] = None):
    """Feed ``value`` into hash ``h`` by content, every item length-delimited and typed: tensors by bytes, scalars
    and strings by repr, lists/tuples/dicts/sets item by item (dicts and sets in sorted order), functions by
    qualified name, defaults and closure, modules by their weights, other objects by class and attributes."""
    seen = set() if seen is None else seen
    if torch.is_tensor(value):
        _item(h, b"T", tensor_digest(value).encode())
        return
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        _item(h, b"S", f"{type(value).__name__}:{value!r}".encode())
        return
    if isinstance(value, torch.dtype) or isinstance(value, torch.device):
        _item(h, b"S", repr(value).encode())
        return
    marker = id(value)   # cycle guard only; never part of the digest
    if marker in seen:
        _item(h, b"C", type(value).__qualname__.encode())
        return
    seen.add(marker)
    try:
        if isinstance(value, (list, tuple)):
            _item(h, b"L", f"{type(value).__name__}:{len(value)}".encode())
            for v in value:
                feed(h, v, depth, seen)
        elif isinstance(value, dict):
            _item(h, b"D", str(len(value)).encode())
            for k in sorted(value, key=repr):
                feed(h, k, depth, seen)
                feed(h, value[k], depth, seen)
        elif isinstance(value, (set, frozenset)):
            _item(h, b"E", str(len(value)).encode())
            for v in sorted(value, key=repr):
                feed(h, v, depth, seen)
        elif isinstance(value, torch.nn.Module):
            _item(h, b"M", _qualname(type(value)).encode())
            _item(h, b"W", module_digest(value).encode())
        elif depth >= DIGEST_DEPTH:
            _item(h, b"O", _qualname(type(value)).encode())
        elif hasattr(value, "func") and hasattr(value, "args") and hasattr(value, "keywords"):   # functools.partial
            _item(h, b"P", b"partial")
            for part in (value.func, value.args, value.keywords):
                feed(h, part, depth + 1, seen)
        elif hasattr(value, "__func__") and hasattr(value, "__self__"):   # a bound method
            _item(h, b"B", _qualname(value.__func__).encode())
            feed(h, value.__self__, depth + 1, seen)
        elif hasattr(value, "__code__"):   # a function: its name, defaults and what it closes over
            _item(h, b"F", _qualname(value).encode())
            feed(h, [value.__defaults__, value.__kwdefaults__,
                     [c.cell_contents for c in (value.__closure__ or ()) if _filled(c)]], depth + 1, seen)
        elif isinstance(value, type):
            _item(h, b"K", _qualname(value).encode())
        else:
            _item(h, b"O", _qualname(type(value)).encode())
            state = getattr(value, "__dict__", None)
            if state is None and hasattr(type(value), "__slots__"):
                state = {k: getattr(value, k) for k in type(value).__slots__ if hasattr(value, k)}
            if state is not None:
                feed(h, dict(state), depth + 1, seen)
            elif callable(value):
                pass
            else:
                _item(h, b"R", repr(value)[:200].encode())
    finally:
        seen.discard(marker)


def _filled(cell) -> bool:
    try:
        cell.cell_contents
        return True
    except ValueError:
        return False


def _qualname(obj) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def module_digest(module: torch.nn.Module) -> str:
    """Content hash of a module's parameters and buffers, computed once and remembered on the module."""
    memo = module.__dict__.get(_MEMO)
    if memo is not None:
        return memo
    h = hashlib.sha256()
    for name, t in module.state_dict(keep_vars=True).items():
        _item(h, b"N", name.encode())
        _item(h, b"T", tensor_digest(t).encode())
    out = h.hexdigest()
    module.__dict__[_MEMO] = out
    return out


def digest(*values) -> str:
    """Hex sha256 of ``values`` fed item by item (see ``feed``)."""
    h = hashlib.sha256()
    feed(h, list(values))
    return h.hexdigest()


@dataclass
class NullText:
    """Unconditional embeddings that make CFG sampling retrace an INVERSION's chain (null-text inversion), or the
    zero-cost negative-prompt inversion (the source prompt used as the unconditional prompt).

    ``embeddings[i]`` is the unconditional context for forward sampling step ``i`` (``sigmas[i]`` -> ``sigmas[i+1]``)
    at guidance ``cfg``; None for the negative-prompt method."""

    method: str                          # "null-text" | "negative-prompt"
    embeddings: Optional[torch.Tensor]   # [steps, 1, tokens, dim] float32 CPU, or None
    positive: list                       # CONDITIONING of the source prompt it was made with
    negative: list                       # CONDITIONING whose context was optimised (null-text), else the positive
    cfg: float
    sigmas: torch.Tensor                 # the inversion's forward schedule
    scheduler: str
    inversion_fingerprint: tuple
    losses: Optional[torch.Tensor] = None        # [steps] final loss (MSE of the latent after the step)
    inner_iters: Optional[torch.Tensor] = None   # [steps] optimiser iterations spent
    final_error: Optional[float] = None          # max |x_0 - source| (LATENT units) of the guided reconstruction
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        return int(self.sigmas.shape[0]) - 1

    def check_inversion(self, inversion: "Inversion"):
        if inversion is None:
            raise InversionChainError("a NULL_TEXT needs the INVERSION it was made from; connect it to "
                                      "`inversion` as well.")
        if inversion_fingerprint(inversion) != self.inversion_fingerprint:
            raise InversionChainError(
                "the NULL_TEXT was made from another INVERSION (other image, model, steps or scheduler). "
                "Feed Null-Text Inversion the same INVERSION as this node.")

    def summary(self) -> str:
        if self.method != "null-text":
            return f"NULL_TEXT: {self.method} inversion, {self.steps} steps, cfg {self.cfg} (no optimisation)"
        iters = int(self.inner_iters.sum()) if self.inner_iters is not None else 0
        worst = float(self.losses.max()) if self.losses is not None else float("nan")
        return (f"NULL_TEXT: null-text inversion, {self.steps} steps, cfg {self.cfg}, {iters} optimiser iterations, "
                f"worst step loss {worst:.3g}, reconstruction max error {self.final_error:.3g}, "
                f"{self.seconds:.1f}s ({self.seconds / max(1, self.steps):.2f}s per step)")


# -- StyleDiffusion -----------------------------------------------------------------------------------------------
STYLE = "STYLE"


@dataclass
class Style:
    """A real image's StyleDiffusion inversion: per sampling step, the value input of cross-attention in the
    conditional branch (keys keep the prompt), produced by that step's trained mapper in eval mode.

    ``values[i]`` is used for forward step ``i`` (``sigmas[i]`` -> ``sigmas[i+1]``); the mappers themselves are
    not kept (their output for this one image is all that sampling needs)."""

    values: torch.Tensor                 # [steps, 1, tokens, dim] float32 CPU
    positive: list                       # CONDITIONING of the source prompt (keys)
    negative: list                       # CONDITIONING of the unconditional prompt it was trained with
    cfg: float
    sigmas: torch.Tensor
    scheduler: str
    inversion_fingerprint: tuple
    model_key: ModelKey
    settings: dict                       # inner_steps, learning_rate, attention_loss_weight, image tokens/width
    losses: list                         # per step: the loss of every inner iteration (training curve)
    latent_losses: list                  # per step: final latent MSE
    inner_iters: torch.Tensor            # [steps]
    final_error: float                   # max |x_0 - source| (LATENT units) of the guided reconstruction
    seconds: float = 0.0
    cache_key: str = ""
    from_cache: str = ""                 # "" (trained now), "memory" or "disk"

    @property
    def steps(self) -> int:
        return int(self.sigmas.shape[0]) - 1

    def check(self, model_key: ModelKey, inversion: Optional["Inversion"] = None):
        if not isinstance(self, Style):
            raise InversionChainError("`style` must come from StyleDiffusion Mapper.")
        if model_key != self.model_key:
            raise InversionChainError(
                f"the STYLE was trained on a different model.\n  style: {self.model_key.describe()}\n"
                f"  this model: {model_key.describe()}\nTrain the mapper with the model you sample with.")
        if inversion is not None and inversion_fingerprint(inversion) != self.inversion_fingerprint:
            raise InversionChainError(
                "the STYLE was trained on another INVERSION (other image, steps or scheduler). Feed the "
                "StyleDiffusion Mapper the same INVERSION as this node.")

    def summary(self) -> str:
        iters = int(self.inner_iters.sum())
        origin = f", loaded from the {self.from_cache} cache" if self.from_cache else ""
        kept = min(self.losses[-1]) if self.losses and self.losses[-1] else float("nan")
        return (f"STYLE: {self.steps} steps, cfg {self.cfg}, {iters} optimiser iterations, last step's kept loss "
                f"{kept:.3g}, reconstruction max error {self.final_error:.3g}, trained in {self.seconds:.1f}s{origin}")
