"""Reference-cache bytes of KV Inject and RIVAL at real model sizes, from the real layer shapes, without weights.

The SD1.5 and SDXL UNets are built by ComfyUI's own UNetModel on the ``meta`` device (shapes only, no memory), with
the configs ComfyUI's model detection recognises as SD15 / SDXL (checked: ``model_config_from_unet_config``), and
walked by the pack's own ``enumerate_layers``. The bytes are the store's own ``ReferenceKV.estimate_bytes`` (what the
budget is checked against; tests prove it equals what a fill holds), fp16 storage, 50 steps, for what each editor
records: KV Inject's default (start_percent 0.08 -> steps 4-49, layers from the family default start layer, one CFG
branch at cfg 1, two with a negative prompt) and RIVAL (every step and self-attention layer, both CFG branches).
Then what ``cache=auto`` decides (``partial_reference.cached_steps``): cache the entry whole, or the first steps
that fit (the rest recomputed), or recompute; the store's budget is 40% of free memory on the device (GPU, then
CPU RAM).

Flux (FLUX.1-dev at 1024 px): ComfyUI's own ``comfy.ldm.flux.model.Flux`` built on the meta device with FLUX.1-dev's
sizes (19 double + 38 single blocks, hidden 3072, 24 heads), walked by the pack's ``dit_layers.enumerate_blocks``;
the bytes are ``DiTReferenceKV.estimate_bytes`` (image-token K and V, bf16 as the model computes, 28 steps: the
usual Flux-dev count): KV Inject's default (Stable Flow's vital layers, start_percent 0.08) and every block, and what
``cache=auto`` decides, by the same rule as for the UNets.

Qwen-Image (20B at 1024 px): ComfyUI's own ``QwenImageTransformer2DModel`` on the meta device with the sizes ComfyUI's
model config gives the released checkpoint (60 joint blocks, 24 heads x 128 = hidden 3072; QWEN_IMAGE_20B says where
each comes from), 50 steps and true CFG (two halves: Qwen-Image's defaults): KV Inject's default (the middle band,
blocks 15-44) and every block; the GPU budget subtracts the fp8 transformer (parameters counted on the meta model).

    .venv/bin/python scripts/reference_bytes.py [--gpu-gib 24] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.harness import comfy_env  # noqa: E402
from tests.harness.models import SD15_UNET  # noqa: E402

STEPS = 50
# (family, image px) -> UNet config overrides on SD1.5's (the values ComfyUI's model detection lists for SDXL base)
SDXL_UNET = {**SD15_UNET, "num_classes": "sequential", "adm_in_channels": 2816, "model_channels": 320,
             "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
             "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048,
             "num_head_channels": 64, "num_heads": -1, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10]}
CASES = {"sd15": (SD15_UNET, 512, "SD15"), "sdxl": (SDXL_UNET, 1024, "SDXL")}
# fp16 weights ComfyUI keeps on the GPU while sampling (UNet; text encoders and VAE are offloaded), + CUDA context
WEIGHTS_GIB = {"sd15": 1.6 + 0.5, "sdxl": 4.8 + 0.5}


def real_layers(family: str):
    """The pack's AttentionLayer list of the real UNet of ``family``, built on the meta device."""
    comfy_env.setup_comfy()
    pack = comfy_env.load_pack()
    import comfy.model_detection
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config, _, expected = CASES[family]
    detected = comfy.model_detection.model_config_from_unet_config(dict(config))
    if detected is None or type(detected).__name__ != expected:
        raise RuntimeError(f"ComfyUI does not detect the {family} config as {expected} (got {detected!r})")
    kwargs = {**config, **detected.unet_extra_config}
    kwargs.pop("dtype", None)
    with torch.device("meta"):
        unet = UNetModel(**kwargs, dtype=torch.float16, device="meta", operations=comfy.ops.disable_weight_init)
    return pack.attention.core.layers.enumerate_layers(unet), pack


def reference_bytes(family: str, keep: str = "inputs") -> dict:
    layers, pack = real_layers(family)
    from_layer = pack.attention.core.layers.decoder_start(layers)
    steps_within = pack.attention.core.schedule.steps_within
    ReferenceKV = pack.attention.store.reference.ReferenceKV
    px = CASES[family][1]
    inversion = SimpleNamespace(latent_shape=(1, 4, px // 8, px // 8))
    kv_layers = pack.attention.core.layers.select_layers(layers, start=from_layer)

    def estimate(layer_list, steps, branches):
        return ReferenceKV(inversion, layer_list, steps, branches=branches, keep=keep).estimate_bytes()

    return {
        "family": family, "image_px": px, "keep": keep, "layers": len(layers),
        "channels_x_tokens": sorted({(l.channels, l.grid(px // 8, px // 8)[0] * l.grid(px // 8, px // 8)[1])
                                     for l in layers}),
        "per_step_per_branch_all_layers": estimate(layers, [0], 1) - 4 * 4 * (px // 8) ** 2,
        "kv_inject_default": {"start_layer": from_layer, "layers": len(kv_layers),
                              "steps": len(steps_within(STEPS, 0.08)),
                              "bytes": estimate(kv_layers, steps_within(STEPS, 0.08), 1)},
        "kv_inject_default_with_negative": {"start_layer": from_layer, "layers": len(kv_layers),
                                            "steps": len(steps_within(STEPS, 0.08)),
                                            "bytes": estimate(kv_layers, steps_within(STEPS, 0.08), 2)},
        "rival": {"layers": len(layers), "steps": STEPS, "branches": 2,
                  "bytes": estimate(layers, range(STEPS), 2)},
    }


FLUX_DEV = {"in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096, "hidden_size": 3072,
            "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38, "axes_dim": [16, 56, 56],
            "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True, "txt_ids_dims": []}
FLUX_STEPS, FLUX_PX = 28, 1024
FLUX_WEIGHTS_GIB = 22.2 + 0.5   # bf16 FLUX.1-dev transformer kept on the GPU while sampling, + CUDA context


def flux_reference_bytes() -> dict:
    """KV Inject's reference bytes on FLUX.1-dev at 1024 px, from the real block shapes (meta device)."""
    comfy_env.setup_comfy()
    pack = comfy_env.load_pack()
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    with torch.device("meta"):
        dm = Flux(dtype=torch.bfloat16, device="meta", operations=comfy.ops.disable_weight_init, **FLUX_DEV)
    patcher = SimpleNamespace(model=SimpleNamespace(diffusion_model=dm))
    dit_layers = pack.attention.core.dit_layers
    store = pack.attention.store.dit_reference
    blocks = dit_layers.enumerate_blocks(patcher)
    latent_shape = (1, 16, FLUX_PX // 8, FLUX_PX // 8)
    tokens = store.image_tokens(patcher, latent_shape)
    steps = pack.attention.core.schedule.steps_within(FLUX_STEPS, 0.08)
    inversion = SimpleNamespace(latent_shape=latent_shape)

    def estimate(chosen, branches):
        return store.DiTReferenceKV(inversion, chosen, steps, tokens, torch.bfloat16, branches).estimate_bytes()

    vital = dit_layers.select_blocks(blocks, -1)
    return {"family": "flux-dev", "image_px": FLUX_PX, "blocks": len(blocks), "image_tokens": tokens,
            "steps": len(steps), "per_block_per_step_per_branch": estimate(blocks[:1], 1) // len(steps),
            "kv_inject_default": {"blocks": [b.position for b in vital], "bytes": estimate(vital, 1)},
            "kv_inject_every_block": {"blocks": len(blocks), "bytes": estimate(blocks, 1)},
            "kv_inject_default_two_halves": {"blocks": [b.position for b in vital], "bytes": estimate(vital, 2)}}


# Qwen-Image (20B) as ComfyUI builds it: comfy.supported_models.QwenImage (unet_config {"image_model": "qwen_image"});
# comfy/model_detection.py reads in_channels from img_in.weight (64 = 16 latent channels x 2 x 2 patch) and counts
# transformer_blocks (60 in the released checkpoint); heads 24 x 128, text width 3584 are the class defaults of
# comfy.ldm.qwen_image.model.QwenImageTransformer2DModel, which the detection keeps.
QWEN_IMAGE_20B = {"in_channels": 64, "out_channels": 16, "num_layers": 60}
QWEN_STEPS, QWEN_PX = 50, 1024   # Qwen-Image's default: 50 steps, true CFG 4 (workflows/ddim_invert_reconstruct_qwen)


def qwen_reference_bytes() -> dict:
    """KV Inject's reference bytes on Qwen-Image (20B) at 1024 px, from the real block shapes (meta device)."""
    comfy_env.setup_comfy()
    pack = comfy_env.load_pack()
    import comfy.ops
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

    with torch.device("meta"):
        dm = QwenImageTransformer2DModel(dtype=torch.bfloat16, device="meta",
                                         operations=comfy.ops.disable_weight_init, **QWEN_IMAGE_20B)
    params = sum(p.numel() for p in dm.parameters())
    patcher = SimpleNamespace(model=SimpleNamespace(diffusion_model=dm))
    dit_layers = pack.attention.core.dit_layers
    store = pack.attention.store.dit_reference
    blocks = dit_layers.enumerate_blocks(patcher)
    latent_shape = (1, 16, 1, QWEN_PX // 8, QWEN_PX // 8)   # Qwen-Image's VAE (Wan 2.1): [B, 16, 1, H/8, W/8]
    tokens = store.image_tokens(patcher, latent_shape)
    steps = pack.attention.core.schedule.steps_within(QWEN_STEPS, 0.08)
    inversion = SimpleNamespace(latent_shape=latent_shape)

    def estimate(chosen, branches):
        return store.DiTReferenceKV(inversion, chosen, steps, tokens, torch.bfloat16, branches).estimate_bytes()

    band = dit_layers.select_blocks(blocks, -1)
    first, last = band[0].position, band[-1].position
    return {"family": "qwen-image-20b", "image_px": QWEN_PX, "blocks": len(blocks), "image_tokens": tokens,
            "hidden": blocks[0].heads * blocks[0].head_dim, "params": params,
            "weights_gib": {"fp8": params / 2 ** 30, "bf16": 2 * params / 2 ** 30},
            "steps": len(steps), "per_block_per_step_per_branch": estimate(blocks[:1], 1) // len(steps),
            "kv_inject_default_two_halves": {"blocks": f"{first}-{last}", "bytes": estimate(band, 2)},
            "kv_inject_default": {"blocks": f"{first}-{last}", "bytes": estimate(band, 1)},
            "kv_inject_every_block_two_halves": {"blocks": len(blocks), "bytes": estimate(blocks, 2)}}


def auto_decision(need: int, steps: int, free_bytes: float) -> str:
    """What the store does with an entry of ``need`` bytes over ``steps`` steps (``partial_reference.cached_steps``):
    cache it whole, cache the first steps that fit and recompute the rest, or recompute every step."""
    budget = 0.4 * free_bytes
    fit = min(steps, int(budget // (need / steps)))
    if fit == steps:
        return f"cache ({need / 2 ** 30:.2f} <= {budget / 2 ** 30:.1f} GiB)"
    if fit > 0:
        return f"partial: first {fit} of {steps} steps cached ({need / 2 ** 30:.2f} > {budget / 2 ** 30:.1f} GiB)"
    return f"recompute ({need / 2 ** 30:.2f} > {budget / 2 ** 30:.1f} GiB, not one step fits)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu-gib", type=float, default=24.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import psutil
    ram_free = psutil.virtual_memory().available
    rows = []
    for family in CASES:
        for keep in ("inputs", "kv"):
            r = reference_bytes(family, keep)
            gpu_free = (args.gpu_gib - WEIGHTS_GIB[family]) * 2 ** 30
            for editor in ("kv_inject_default", "kv_inject_default_with_negative", "rival"):
                need, steps = r[editor]["bytes"], r[editor]["steps"]
                r[editor]["auto_gpu"] = auto_decision(need, steps, gpu_free)
                r[editor]["auto_this_cpu"] = auto_decision(need, steps, ram_free)
            rows.append(r)
    flux = flux_reference_bytes()
    flux_gpu_free = max(0.0, (args.gpu_gib - FLUX_WEIGHTS_GIB) * 2 ** 30)
    for editor in ("kv_inject_default", "kv_inject_every_block", "kv_inject_default_two_halves"):
        flux[editor]["auto_gpu"] = auto_decision(flux[editor]["bytes"], flux["steps"], flux_gpu_free)
        flux[editor]["auto_this_cpu"] = auto_decision(flux[editor]["bytes"], flux["steps"], ram_free)
    qwen = qwen_reference_bytes()
    qwen_gpu_free = max(0.0, (args.gpu_gib - qwen["weights_gib"]["fp8"] - 0.5) * 2 ** 30)
    qwen_editors = ("kv_inject_default_two_halves", "kv_inject_default", "kv_inject_every_block_two_halves")
    for editor in qwen_editors:
        qwen[editor]["auto_gpu"] = auto_decision(qwen[editor]["bytes"], qwen["steps"], qwen_gpu_free)
        qwen[editor]["auto_this_cpu"] = auto_decision(qwen[editor]["bytes"], qwen["steps"], ram_free)
    if args.json:
        print(json.dumps({"gpu_gib": args.gpu_gib, "this_machine_free_ram_gib": ram_free / 2 ** 30, "rows": rows,
                          "flux": flux, "qwen_image": qwen}, indent=1))
        return
    print(f"GPU {args.gpu_gib:g} GiB (free = total - fp16 UNet - 0.5 GiB context); this machine: "
          f"{ram_free / 2 ** 30:.1f} GiB RAM available. Budget = 40% of free. {STEPS} steps, fp16 storage.")
    print("| family, px | keep | layers | MiB/step/branch | editor | bytes | auto, GPU | auto, this CPU |")
    print("|---|---|---|---|---|---|---|---|")
    names = {"kv_inject_default": "KV Inject default, 1 branch (cfg 1)",
             "kv_inject_default_with_negative": "KV Inject default, 2 branches (negative, cfg > 1)",
             "rival": "RIVAL (2 branches, all layers)"}
    for r in rows:
        for editor, label in names.items():
            e = r[editor]
            where = f"{e['layers']} layers from {e['start_layer']}, " if "start_layer" in e else ""
            print(f"| {r['family']} {r['image_px']} | {r['keep']} | {r['layers']} | "
                  f"{r['per_step_per_branch_all_layers'] / 2 ** 20:.0f} | {label} | "
                  f"{e['bytes'] / 2 ** 30:.2f} GiB ({where}{e['steps']} steps) | {e['auto_gpu']} "
                  f"| {e['auto_this_cpu']} |")

    print(f"\nFLUX.1-dev {flux['image_px']} px: {flux['blocks']} blocks, {flux['image_tokens']} image tokens, "
          f"{flux['steps']} of {FLUX_STEPS} steps (start_percent 0.08), bf16 K and V: "
          f"{flux['per_block_per_step_per_branch'] / 2 ** 20:.1f} MiB per block, step and CFG half. GPU free = "
          f"{args.gpu_gib:g} GiB - {FLUX_WEIGHTS_GIB:g} GiB (bf16 transformer + context).")
    print("| Flux editor | blocks | bytes | auto, GPU | auto, this CPU |")
    print("|---|---|---|---|---|")
    labels = {"kv_inject_default": "KV Inject default (vital layers), 1 half (cfg 1)",
              "kv_inject_every_block": "KV Inject, every block, 1 half",
              "kv_inject_default_two_halves": "KV Inject default, 2 halves (true CFG)"}
    for editor, label in labels.items():
        e = flux[editor]
        print(f"| {label} | {e['blocks']} | {e['bytes'] / 2 ** 30:.2f} GiB | {e['auto_gpu']} | {e['auto_this_cpu']} |")

    print(f"\nQwen-Image 20B {qwen['image_px']} px: {qwen['blocks']} joint blocks (hidden {qwen['hidden']}), "
          f"{qwen['image_tokens']} image tokens, {qwen['steps']} of {QWEN_STEPS} steps (start_percent 0.08), bf16 K "
          f"and V: {qwen['per_block_per_step_per_branch'] / 2 ** 20:.1f} MiB per block, step and CFG half. "
          f"{qwen['params'] / 1e9:.2f} G parameters; GPU free = {args.gpu_gib:g} GiB - "
          f"{qwen['weights_gib']['fp8']:.1f} GiB (fp8 transformer, as ComfyUI's Qwen-Image workflow) - 0.5 GiB.")
    print("| Qwen-Image editor | blocks | bytes | auto, GPU | auto, this CPU |")
    print("|---|---|---|---|---|")
    labels = {"kv_inject_default_two_halves": "KV Inject default (middle band), 2 halves (true CFG 4)",
              "kv_inject_default": "KV Inject default, 1 half (cfg 1)",
              "kv_inject_every_block_two_halves": "KV Inject, every block, 2 halves"}
    for editor, label in labels.items():
        e = qwen[editor]
        print(f"| {label} | {e['blocks']} | {e['bytes'] / 2 ** 30:.2f} GiB | {e['auto_gpu']} | {e['auto_this_cpu']} |")


if __name__ == "__main__":
    main()
