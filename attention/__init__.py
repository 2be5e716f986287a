"""Attention control on ComfyUI's MODEL, by role (imports point down: core <- store <- editors, viewer):

- ``core/``: the Controller that every patched attention call goes through (``controller``), the one module that
  talks to ComfyUI's patch API (``patching``), the model's attention layers (``layers``), the schedule that places a
  call on a step (``schedule``), per-step context patches (``context``) and word lookup in CLIP tokens (``tokens``).
- ``store/``: real-image K/V recorded from an INVERSION, cached with a byte budget (``reference``,
  ``partial_reference``) and given back when ComfyUI frees memory (``store_memory``).
- ``editors/``: what changes attention: P2Plus (``p2p``, ``edit_plan``, ``local_blend``), KV Inject
  (``kv_inject``), RIVAL (``rival``), StyleDiffusion (``style``) and decoder feature injection (``feature_inject``).
- ``viewer/``: attention maps captured during sampling and drawn as images; it edits nothing.

How an editor plugs in (RIVAL, P2Plus, StyleDiffusion, map capture all follow this):

1. Subclass ``core.controller.Editor``. Say where it may act (``layers(all_layers)``, ``kinds`` = "self"/"cross")
   and when (``active(ctx)``); override only the hooks it needs:
   ``edit_qkv`` (change projected q/k/v, e.g. swap in reference K/V), ``attend`` (compute attention itself),
   ``needs_probs``/``edit_probs`` (read or replace attention probabilities), ``edit_out``.
   ``ctx`` (``core.controller.CallContext``) carries the layer (``core.layers.AttentionLayer``: index, ComfyUI key,
   part, level/grid), the step (``core.schedule.StepInfo``: index, total, sigma, timestep, fraction), the batch
   layout (``cond_or_uncond``, ``rows_per_chunk``, ``chunk_rows(0|1)``) and a per-call ``scratch`` dict.
2. ``core.patching.install(model, editor)`` returns a patched ``model.clone()``; several editors on one MODEL
   compose in ascending ``Editor.order`` (K/V sources 10, map editors 50, observers 90). The original MODEL is
   never changed; other packs' replace patches in the same slots are wrapped, not overwritten.
3. Real-image K/V: ``store.reference.ReferenceKV`` records a reference latent's K/V (and cross-attention maps)
   during a reference pass, cached per INVERSION (GPU / CPU, fp16) or recomputed per step by a UNet wrapper.
4. Schedules (``core.schedule``): the Controller places every UNet call on the editors' schedule once
   (``ctx.step``); editors read only that, and hooks that are not editors (context patches, local blend, feature
   hooks, reference recording) place their sigma with ``core.schedule.locate`` / ``Schedule.index``, the one
   sigma -> step code. Every "when" is a fraction of the steps: step i of N acts when start <= i/N < end.
   A new run (sigma rises, or another MODEL clone samples) calls ``Editor.begin_run``.
"""
