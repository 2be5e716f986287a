"""Attention editing core: editors, and the single module (patching.py) that talks to ComfyUI's patch API.

How an editor plugs in (RIVAL, P2Plus, StyleDiffusion, map capture all follow this):

1. Subclass ``controller.Editor``. Say where it may act (``layers(all_layers)``, ``kinds`` = "self"/"cross")
   and when (``active(ctx)``); override only the hooks it needs:
   ``edit_qkv`` (change projected q/k/v, e.g. swap in reference K/V), ``attend`` (compute attention itself),
   ``needs_probs``/``edit_probs`` (read or replace attention probabilities), ``edit_out``.
   ``ctx`` (``controller.CallContext``) carries the layer (``layers.AttentionLayer``: index, ComfyUI key, part,
   level/grid), the step (``schedule.StepInfo``: index, total, sigma, timestep, fraction), the batch layout
   (``cond_or_uncond``, ``rows_per_chunk``, ``chunk_rows(0|1)``) and a per-call ``scratch`` dict.
2. ``patching.install(model, editor, what)`` returns a patched ``model.clone()``; several editors on one MODEL
   compose in ascending ``Editor.order`` (K/V sources 10, map editors 50, observers 90). The original MODEL is
   never changed; other packs' replace patches in the same slots are wrapped, not overwritten.
3. Real-image K/V: ``reference.ReferenceKV`` records a reference latent's K/V (and cross-attention maps) during a
   reference pass, cached per INVERSION (GPU / CPU, fp16) or recomputed per step by a UNet wrapper.
4. Schedules (schedule.py): the Controller places every UNet call on the editors' schedule once (``ctx.step``);
   editors read only that. Every "when" is a fraction of the steps: step i of N acts when start <= i/N < end.
   A new run (sigma rises, or another MODEL clone samples) calls ``Editor.begin_run``.
"""
