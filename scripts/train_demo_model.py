"""Train the demo model: a small text-to-image latent diffusion model on four real photos, from ComfyUI's classes.

Recipe (every number here is what produced models/ic_demo_photos.safetensors; see models/README.md):
- Data: scikit-image's astronaut, chelsea, coffee and rocket, 128 px centre crops, one caption each
  (tests/harness/demo_model.py CAPTIONS). Caption dropout 15 % (the empty prompt) so classifier-free guidance works.
- VAE: ComfyUI's TAESD layout. The encoder is SET BY HAND (no training): each 8x8 block becomes
  z0 = 4.8 (luma - 0.45), z1 = 8 (R - luma), z2 = 8 (B - luma), z3 = 9.6 (luma of the block's top half - bottom half),
  i.e. a 16x16x4 colour thumbnail with a little vertical detail. vae_scale = 0.18215 so SD1's latent format hands
  the UNet these unit-scale values. The decoder starts as the hand-set inverse (smooth upsampling) and is then
  fine-tuned alone (stage `vae`: Adam 1e-3, batch 8 random 64 px crops with flips, MSE).
- Text encoder: SD1 CLIP layout (real tokenizer, 77 positions) at width 64, 2 layers, seeded random and FROZEN.
- UNet: ComfyUI's UNetModel, SD1 block layout at width 32, channel_mult [1, 2], 1 res block per level, attention at
  both levels and the middle (7 transformer blocks, 16-channel heads), context 64; V-PREDICTION on SD's
  scaled_linear schedule (v makes the high-noise regime, where the photo is chosen, an easy regression target;
  the small eps model of the feasibility run did not learn it in 707 steps). Stage `unet`: AdamW (1.5e-3 after a
  100-step warm-up, constant, weight decay 0), batch 8 (each photo twice), timesteps uniform in 0..999, plain v MSE
  computed through ComfyUI's own BaseModel.apply_model, EMA 0.995 of the weights is what gets saved.
  Logged every 50 steps: the EMA model's x0 error at t = 500 / 800 / 950 against the trivial predictor (the mean
  photo latent), the progress signal that matters for text-to-image.
- Output: one fp16 safetensors checkpoint (UNet + CLIP + TAESD) loaded by ComfyUI's stock
  load_checkpoint_guess_config once tests/harness/demo_model.register_demo_model_config() ran.

Usage (the committed checkpoint came from the two stages run in parallel, one thread each, then `pack`):
    OMP_NUM_THREADS=1 .venv/bin/python scripts/train_demo_model.py vae  --work /tmp/ic_train
    OMP_NUM_THREADS=1 .venv/bin/python scripts/train_demo_model.py unet --work /tmp/ic_train --steps N
    .venv/bin/python scripts/train_demo_model.py pack --work /tmp/ic_train --out models/ic_demo_photos.safetensors
(the committed checkpoint: `vae --vae-steps 100`, `unet --steps 1000`; models/README.md)
`all` runs the three in sequence. Runs on CPU; uses CUDA when present (--device). Same thread count and device
give the same bytes (CPU kernels are deterministic for a fixed thread count).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.harness import demo_model as dm  # noqa: E402
from tests.harness.comfy_env import setup_comfy  # noqa: E402
from tests.harness.photos import photo  # noqa: E402

SEED = 20261130
PHOTOS = list(dm.CAPTIONS)
CAPTION_DROPOUT = 0.15
ENC_SCALES = (4.8, 8.0, 9.6)   # luma, chroma, vertical detail: unit-ish latent std on the photos


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, flush=True)


# -- weights -------------------------------------------------------------------------------------------------------
def init_module_(module: torch.nn.Module, seed: int, zero_suffixes=()):
    """PyTorch-style uniform fan-in init from a seeded generator (ComfyUI leaves weights uninitialised); norms at 1/0;
    output projections named in zero_suffixes start at zero (as LDM's zero_module does)."""
    gen = torch.Generator().manual_seed(seed)
    # norm layers by type, not by name: SD's UNet names its GroupNorms in_layers.0 / out_layers.0 / out.0
    norm_params = {f"{mname}.{pname}" if mname else pname
                   for mname, mod in module.named_modules()
                   if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm))
                   for pname, _ in mod.named_parameters(recurse=False)}
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if any(name.endswith(s) for s in zero_suffixes):
                p.zero_()
            elif name in norm_params:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif "embedding" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif p.ndim >= 2:
                bound = p[0].numel() ** -0.5
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
            else:
                p.zero_()


def hand_set_taesd():
    """TAESD with the encoder set to the block-average colour code above and the decoder to its smooth inverse."""
    import comfy.taesd.taesd as taesd_mod
    vae = taesd_mod.TAESD()
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        vae.vae_scale.fill_(dm.VAE_SCALE)
        enc = vae.taesd_encoder
        # conv 0: copy R, G, B to channels 0..2 and a constant 1 to channel 4 (the strided convs have no bias)
        for c in range(3):
            enc[0].weight[c, c, 1, 1] = 1.0
        enc[0].bias[4] = 1.0
        # Blocks: conv branch zero -> ReLU(x) = x for these non-negative channels. Strided convs: 2x2 mean.
        for i in (2, 6, 10):
            for c in (0, 1, 2, 4):
                enc[i].weight[c, c, 1:3, 1:3] = 0.25
        # last strided conv also writes channel 3 = luma(top half) - luma(bottom half) + 1 (kept non-negative)
        for c in range(3):
            enc[10].weight[3, c, 1, 1:3] = 1 / 6
            enc[10].weight[3, c, 2, 1:3] = -1 / 6
        enc[10].weight[3, 4, 1, 1] = 1.0
        out = enc[14]
        ky, kc, kd = ENC_SCALES
        out.weight[0, 0:3, 1, 1] = ky / 3                       # ky * luma
        out.bias[0] = -ky * 0.45
        out.weight[1, 0:3, 1, 1] = torch.tensor([2, -1, -1]) * kc / 3   # kc (R - luma)
        out.weight[2, 0:3, 1, 1] = torch.tensor([-1, -1, 2]) * kc / 3   # kc (B - luma)
        out.weight[3, 3, 1, 1] = kd
        out.bias[3] = -kd
        dec = vae.taesd_decoder
        # conv 1 (after Clamp): R, G, B in 0..1 from (z0, z1, z2); ReLU keeps them
        dec[1].weight[0, :3, 1, 1] = torch.tensor([1 / ky, 1 / kc, 0.0])
        dec[1].weight[1, :3, 1, 1] = torch.tensor([1 / ky, -1 / kc, -1 / kc])
        dec[1].weight[2, :3, 1, 1] = torch.tensor([1 / ky, 0.0, 1 / kc])
        dec[1].bias[:3] = 0.45
        smooth = torch.tensor([1.0, 2.0, 1.0])
        smooth = torch.outer(smooth, smooth) / 16
        for i in (7, 12, 17):          # conv after each nearest upsample: [1 2 1]^2 smoothing per channel
            for c in range(3):
                dec[i].weight[c, c] = smooth
        dec[19].weight[:3, :3, 1, 1] = torch.eye(3)
        # decode() maps 0..1 to -1..1 itself (sub(0.5).mul(2)), so the output is the RGB in 0..1
    return vae


def round_fp16_(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())
    return module


@torch.no_grad()
def build_clip_state(seed: int) -> dict:
    import comfy.sd1_clip as sd1
    clip = sd1.SDClipModel(device="cpu", dtype=torch.float32, textmodel_json_config=dm.clip_config_path())
    init_module_(clip, seed)
    round_fp16_(clip)
    return {f"cond_stage_model.{k}": v for k, v in clip.state_dict().items()
            if k not in ("transformer.text_projection.weight", "logit_scale") and "position_ids" not in k}


@torch.no_grad()
def build_unet_state(seed: int) -> dict:
    import comfy.ldm.modules.diffusionmodules.openaimodel as oai
    import comfy.ops
    unet = oai.UNetModel(**dm.UNET, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    init_module_(unet, seed, zero_suffixes=("out.2.weight", "out.2.bias", "out_layers.3.weight",
                                            "out_layers.3.bias", "proj_out.weight", "proj_out.bias"))
    return {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}


def vae_state(vae) -> dict:
    return {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}


def to_fp16(sd: dict) -> dict:
    return {k: (v.detach().half() if v.is_floating_point() else v).contiguous().cpu() for k, v in sd.items()}


def photos_tensor() -> torch.Tensor:
    """[4, 3, 128, 128] in 0..1."""
    return torch.cat([photo(n, dm.SIZE) for n in PHOTOS]).permute(0, 3, 1, 2).contiguous()


def save(sd: dict, path: Path):
    import comfy.utils
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    comfy.utils.save_torch_file(sd, str(tmp))
    os.replace(tmp, path)


# -- stage vae: decoder fine-tune ----------------------------------------------------------------------------------
def train_vae(work: Path, steps: int, device: str):
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED + 10)
    vae = hand_set_taesd()
    round_fp16_(vae)
    imgs = photos_tensor()
    vae.to(device)
    with torch.no_grad():
        psnr0 = psnr(decode(vae, encode(vae, imgs.to(device))), imgs.to(device))
    log(f"vae: hand-set TAESD, PSNR at 128 px per photo {fmt(psnr0)}")
    opt = torch.optim.Adam(vae.taesd_decoder.parameters(), lr=1e-3)
    vae.taesd_encoder.requires_grad_(False)
    vae.vae_scale.requires_grad_(False)
    t0 = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(PHOTOS), (8,), generator=gen)
        oy = torch.randint(0, 9, (8,), generator=gen) * 8
        ox = torch.randint(0, 9, (8,), generator=gen) * 8
        flip = torch.rand(8, generator=gen) < 0.5
        batch = []
        for i in range(8):
            crop = imgs[idx[i], :, oy[i]:oy[i] + 64, ox[i]:ox[i] + 64]
            batch.append(crop.flip(-1) if flip[i] else crop)
        x = torch.stack(batch).to(device)
        with torch.no_grad():
            z = encode(vae, x)
        loss = torch.nn.functional.mse_loss(decode(vae, z), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == steps:
            with torch.no_grad():
                p = psnr(decode(vae, encode(vae, imgs.to(device))), imgs.to(device))
            log(f"vae step {step}/{steps} loss {loss.item():.5f} PSNR {fmt(p)} ({time.time() - t0:.0f} s)")
            torch.save(vae.state_dict(), work / "vae.pt")
    torch.save(vae.state_dict(), work / "vae.pt")
    (work / "vae.done").write_text("ok")


def encode(vae, x01):
    return vae.taesd_encoder(x01) / vae.vae_scale * dm.VAE_SCALE   # model-space latent (raw * 0.18215)


def decode(vae, z):
    return vae.taesd_decoder(z / dm.VAE_SCALE * vae.vae_scale)


def psnr(a, b):
    mse = ((a.clamp(0, 1) - b) ** 2).flatten(1).mean(1)
    return (10 * torch.log10(1 / mse)).tolist()


def fmt(values):
    return " ".join(f"{v:.2f}" for v in values) + f" (mean {sum(values) / len(values):.2f} dB)"


# -- stage unet ----------------------------------------------------------------------------------------------------
def initial_checkpoint(work: Path) -> Path:
    """Seeded random UNet + frozen CLIP + hand-set TAESD, saved so ComfyUI's own loader builds the objects."""
    path = work / "init.safetensors"
    if not path.is_file():
        vae = round_fp16_(hand_set_taesd())
        sd = {**build_unet_state(SEED), **build_clip_state(SEED + 1), **vae_state(vae)}
        save(sd, path)
    return path


def train_unet(work: Path, steps: int, device: str, ckpt_every: int, batch: int = 8, lr: float = 1.5e-3):
    import comfy.sd
    dm.register_demo_model_config()
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED + 20)
    with torch.no_grad():  # not inference_mode: the UNet's weights must stay trainable tensors
        model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(str(initial_checkpoint(work)), output_vae=True,
                                                                    output_clip=True)
    base = model.model
    log(f"unet: {type(base.model_config).__name__}, {type(base.model_sampling).__name__}, "
        f"{sum(p.numel() for p in base.diffusion_model.parameters()) / 1e6:.2f} M params")
    with torch.no_grad():
        conds = [clip.encode_from_tokens(clip.tokenize(dm.CAPTIONS[n])) for n in PHOTOS]
        uncond = clip.encode_from_tokens(clip.tokenize(""))
        conds = torch.cat(conds + [uncond]).float().to(device)           # [5, 77, 64]
        vae = round_fp16_(hand_set_taesd())
        x0_all = encode(vae, photos_tensor()).to(device)                  # [4, 4, 16, 16], fixed encoder
    log("latent std per channel", x0_all.std(dim=(0, 2, 3)).tolist())
    unet = base.diffusion_model
    unet.to(device).float().train()
    base.model_sampling.to(device)
    unet.requires_grad_(True)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    sigmas_table = base.model_sampling.sigmas.to(device).float()

    def lr_at(step):
        # warm-up, then constant: the run's step-k checkpoint is exactly what `--steps k` produces (the EMA does
        # the averaging a decaying rate would), so a time-boxed run can stop at any checkpoint reproducibly
        return lr * min(1.0, step / 100)

    def forward(x_noisy, sigma, ctx):
        # 2024-03's transformer block adds residuals in place; cloning saved tensors keeps backward valid
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
            return base.apply_model(x_noisy, sigma, c_crossattn=ctx)

    eval_noise = torch.randn(x0_all.shape, generator=torch.Generator().manual_seed(SEED + 30)).to(device)
    baseline = ((x0_all - x0_all.mean(0, keepdim=True)) ** 2).mean().item()

    def evaluate(step):
        saved = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        unet.load_state_dict(ema)
        unet.eval()
        parts = []
        with torch.no_grad():
            for t in (500, 800, 950):
                s = sigmas_table[t].expand(len(PHOTOS))
                den = base.apply_model(x0_all + eval_noise * s[:, None, None, None], s, c_crossattn=conds[:4])
                parts.append(f"t={t} {((den - x0_all) ** 2).mean().item():.4f}")
        unet.load_state_dict(saved)
        unet.train()
        log(f"step {step}: EMA x0 MSE {' '.join(parts)} (trivial mean predictor {baseline:.4f})")

    t0 = time.time()
    photo_idx = torch.arange(batch, device=device) % len(PHOTOS)
    for step in range(1, steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
        noise = torch.randn((batch,) + tuple(x0_all.shape[1:]), generator=gen).to(device)
        drop = (torch.rand(batch, generator=gen) < CAPTION_DROPOUT).to(device)
        x0 = x0_all[photo_idx]
        ctx = conds[torch.where(drop, torch.full_like(photo_idx, len(PHOTOS)), photo_idx)]
        sigma = sigmas_table[t]
        s4 = sigma[:, None, None, None]
        denoised = forward(x0 + noise * s4, sigma, ctx)
        # v MSE written in x0 terms: |v - v_hat|^2 = |x0 - x0_hat|^2 (sigma^2 + 1) / sigma^2
        loss = (((denoised - x0) ** 2).mean(dim=(1, 2, 3)) * (sigma ** 2 + 1) / sigma ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(0.995, (1 + step) / (10 + step))
            for k, v in unet.state_dict().items():
                if v.is_floating_point():
                    ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        if step % 10 == 0 or step <= 5:
            log(f"step {step}/{steps} loss {loss.item():.4f} lr {lr_at(step):.2e} "
                f"({(time.time() - t0) / step:.2f} s/step, {time.time() - t0:.0f} s)")
        if step % 50 == 0:
            evaluate(step)
        if step % ckpt_every == 0 or step == steps:
            torch.save({"step": step, "ema": ema}, work / "unet.pt")
            pack(work, work / f"ic_demo_photos_step{step}.safetensors")
    (work / "unet.done").write_text(str(steps))
    log(f"unet: {steps} steps in {time.time() - t0:.0f} s")


def pack(work: Path, out: Path):
    """Checkpoint = EMA UNet + frozen CLIP + TAESD (fine-tuned decoder if the vae stage has written one), fp16."""
    import comfy.utils
    sd = comfy.utils.load_torch_file(str(initial_checkpoint(work)))
    ema = torch.load(work / "unet.pt")["ema"]
    sd.update({f"model.diffusion_model.{k}": v for k, v in ema.items()})
    if (work / "vae.pt").is_file():
        vae = hand_set_taesd()
        vae.load_state_dict(torch.load(work / "vae.pt"))
        sd.update(vae_state(vae))
    sd = to_fp16(sd)
    save(sd, out)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) sha256 {digest}")
    return digest


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["vae", "unet", "pack", "all"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/ic_train"))
    ap.add_argument("--steps", type=int, default=1600, help="UNet steps")
    ap.add_argument("--vae-steps", type=int, default=300)
    ap.add_argument("--ckpt-every", type=int, default=200)
    ap.add_argument("--out", type=Path, default=dm.CHECKPOINT_PATH)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    setup_comfy()
    torch.use_deterministic_algorithms(True, warn_only=True)
    args.work.mkdir(parents=True, exist_ok=True)
    log(f"stage {args.stage}, device {args.device}, torch threads {torch.get_num_threads()}")
    if args.stage in ("vae", "all"):
        train_vae(args.work, args.vae_steps, args.device)
    if args.stage in ("unet", "all"):
        train_unet(args.work, args.steps, args.device, args.ckpt_every)
    if args.stage in ("pack", "all"):
        pack(args.work, args.out)


if __name__ == "__main__":
    main()
