"""What the reference store's entries hold, and giving it back.

Bytes: an entry keeps alive its recorded tensors (K/V or their inputs, eps, word maps, content features) and also
what it references: the INVERSION (its chain, sigmas, conditioning) and any conditioning kept for recompute. The
store counts every one of those tensors once (entries that share an inversion share its chain), on the device it
is really on.

Release (``compat.on_memory_release``): when ComfyUI unloads all models (its ``/free`` endpoint) the store is
emptied; when ComfyUI needs room on a GPU to load a model and the device is short, the store's entries on that GPU
are moved to the CPU, least recently used first, while the CPU budget holds them, else dropped; entries whose model
is gone (an inputs cache cannot be projected any more) are dropped at every release.
"""
from __future__ import annotations

from typing import Iterable, List

import torch

from ... import compat
from ...logs import log

RECORDED = ("store", "eps", "cross_maps", "features", "qk")   # an entry's dicts of recorded tensors
KEPT = ("recompute_conds", "conds", "conds_uncond")            # conditioning an entry keeps for recompute forwards


def tensors_in(value, depth: int = 0) -> List[torch.Tensor]:
    """The tensors inside nested lists / tuples / dicts."""
    if torch.is_tensor(value):
        return [value]
    if depth > 6:
        return []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_in(v, depth + 1)]
    return []


def recorded_tensors(entry) -> List[torch.Tensor]:
    return [t for name in RECORDED for t in tensors_in(getattr(entry, name, None))]


def entry_tensors(entry) -> List[torch.Tensor]:
    """Every tensor ``entry`` keeps alive: recorded, its inversion's and the conditioning it keeps."""
    out = recorded_tensors(entry)
    inv = getattr(entry, "inversion", None)
    if inv is not None:
        out += tensors_in([inv.chain, inv.sigmas, inv.timesteps, inv.residuals, inv.step_calls, inv.positive,
                           inv.negative])
    for name in KEPT:
        out += tensors_in(getattr(entry, name, None))
    return out


def held_bytes(entries: Iterable, device=None) -> int:
    """Bytes of every tensor the entries hold, each counted once; only those on ``device``'s type when given."""
    kind = torch.device(device).type if device is not None else None
    seen, total = set(), 0
    for entry in entries:
        for t in entry_tensors(entry):
            if id(t) in seen or (kind is not None and t.device.type != kind):
                continue
            seen.add(id(t))   # counted once however many entries hold it
            total += t.numel() * t.element_size()
    return total


def move_entry(entry, device):
    """Move an entry's recorded tensors to ``device`` (the inversion stays where it lives, on the offload device)."""
    device = torch.device(device)
    for name in RECORDED:
        d = getattr(entry, name, None)
        if isinstance(d, dict):
            for key, value in list(d.items()):
                d[key] = (tuple(t.to(device) for t in value) if isinstance(value, tuple)
                          else value.to(device) if torch.is_tensor(value) else value)
    entry.storage_device = device


def release(store, reason: str, device=None, memory_required=None):
    """The store's answer to ComfyUI freeing memory (see the module docstring)."""
    dead = store.drop_unusable()
    if reason == "unload_all":
        if store.entries or dead:
            log.info("[Inversion Chain] ComfyUI freed memory: releasing the reference cache (%.1f MB)",
                     (store.held_bytes() + dead) / 2 ** 20)
        store.clear()
        return
    if device is None or torch.device(device).type == "cpu":
        return
    device, cpu = torch.device(device), torch.device("cpu")
    for key in [k for k, e in store.entries.items() if e.storage_device.type == device.type]:   # LRU first
        if memory_required is not None and compat.free_memory(device) >= memory_required:
            break
        entry = store.entries[key]
        size = sum(t.numel() * t.element_size() for t in recorded_tensors(entry))
        if store.held_bytes(cpu) + size <= store.budget(cpu):
            move_entry(entry, cpu)
            log.info("[Inversion Chain] ComfyUI needs room on %s: moved %.1f MB of cached %s to the CPU", device,
                     size / 2 ** 20, entry.noun)
        else:
            store.entries.pop(key)
            log.info("[Inversion Chain] ComfyUI needs room on %s: dropped %.1f MB of cached %s", device,
                     size / 2 ** 20, entry.noun)
