"""Train the scenes model: the demo model's recipe on procedural scenes, so words bind to places.

Recipe (every number here is what produced models/ic_demo_scenes.safetensors; see models/README.md):
- Data: an endless seeded stream of tests/harness/scenes.py scenes at 128 px ("a red circle on a yellow background",
  "a red circle and a blue square on a yellow background"). Steps 1..CURRICULUM_STEP draw one object per scene;
  later steps draw two objects with probability TWO_OBJECT_SHARE (a one-object curriculum first: in the feasibility
  run two-object scenes from the start bound nothing in 1500 steps, one-object scenes cleared 2x by 2500).
  Caption dropout 15 % (the empty prompt) so classifier-free guidance works.
- Model: exactly the photo model's layout and initialisation (scripts/train_demo_model.py: 1.08 M-parameter
  v-prediction SD1-layout UNet, frozen random width-64 CLIP with the real tokenizer, hand-set TAESD, no VAE
  training of its own). The checkpoint's TAESD decoder is the photo model's fine-tuned one (same hand-set encoder,
  so the same latents; at 128 px on scenes it decodes 19.1 dB vs the hand-set inverse's 17.9 dB, mostly at the
  borders), copied from models/ic_demo_photos.safetensors. AdamW 1.5e-3 after a 100-step warm-up, then
  constant (so the step-k checkpoint of a longer run equals a `--steps k` run), batch 8, EMA 0.995 saved.
- Progress signal, logged every --eval-every steps on fixed eval scenes at t = 300 and 600: each colour word's
  cross-attention mass (16x16 layers, heads averaged; "@8": the 8x8 layers) inside its object divided by the
  object's area share (1.0 = no localisation), with the same ratio for the mirror-image mask as a control.

- Grounding stage (`--ground-from`, the second of two runs): the first run's step-4000 checkpoint fine-tuned with
  the diffusion loss plus GROUND_WEIGHT x a token-level grounding loss (TokenCompose, Wang et al. 2024): for each
  object's colour and shape word, (1 - the share of its cross-attention inside the object's drawn mask)^2, every
  attn2 layer, samples with t < GROUND_MAX_T and a caption. Two-object scenes in half the batches from the start,
  AdamW GROUND_LR after a 100-step warm-up, then constant. Without it the first stage's 8x8 layers stayed flat
  and the colour words' own maps reached 1.1x (the frozen causal text encoder carries the colour into the later
  tokens, which the UNet read instead).

    COMFYUI_PATH=.comfyui OMP_NUM_THREADS=1 nice .venv/bin/python scripts/train_scenes_model.py \
        --work /tmp/ic_scenes --steps 4000
    COMFYUI_PATH=.comfyui OMP_NUM_THREADS=1 nice .venv/bin/python scripts/train_scenes_model.py \
        --work /tmp/ic_ground --ground-from /tmp/ic_scenes/ic_demo_scenes_step4000.safetensors --steps 1250
write {work}/ic_demo_scenes_step{k}.safetensors (first stage) and ic_demo_scenes_ground_step{k}.safetensors every
--ckpt-every steps; the second run's step 1250 is the committed file (why 1250: models/README.md; the first run's
step 4000 is models/ic_demo_scenes.safetensors at commit 871b097, `git show 871b097:models/...`). The tree is
the 2024-03 one (`scripts/setup_env.sh 2024-03` makes .comfyui; v0.33's TAESD has a buffer the photo model's decoder
lacks). Same torch build, thread count and device give the same bytes (CPU; CUDA kernels add in another order).
`--repack FILE` rewrites a first-stage checkpoint with the photo model's decoder (what the training run does for
every checkpoint it writes; for checkpoints written before it did).
"""
from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from scripts import train_demo_model as tdm  # noqa: E402
from tests.harness import demo_model as dm  # noqa: E402
from tests.harness import scenes  # noqa: E402
from tests.harness.comfy_env import setup_comfy  # noqa: E402

SEED = 20261203
CURRICULUM_STEP = 2000
TWO_OBJECT_SHARE = 0.5
CAPTION_DROPOUT = 0.15
# grounding stage (--ground-from): fine-tune the one-stage model with a token-level grounding loss
GROUND_LR = 5e-4
GROUND_WEIGHT = 0.1
GROUND_MAX_T = 800           # above this the noisy latent hardly shows where the objects are
LOG = tdm.log


def word_token_index(clip, caption: str) -> dict[str, int]:
    """Position in the 77-token sequence of each caption word that is one CLIP token (all scene words are)."""
    ids = [t[0] if isinstance(t, tuple) else t for t in clip.tokenize(caption)["l"][0]]
    tokenizer = clip.tokenizer.clip_l.tokenizer
    out = {}
    for word in caption.split():
        wid = tokenizer(word)["input_ids"][1:-1]
        if len(wid) == 1 and wid[0] in ids and word not in out:
            out[word] = ids.index(wid[0])
    return out


class CrossAttentionProbe:
    """Records head-averaged softmax(q k^T / sqrt(d)) of every attn2 for one forward: detached for the metric, with
    gradients (``grad``) for the grounding loss."""

    def __init__(self, unet):
        self.maps, self.on, self.grad = [], False, False
        for name, mod in unet.named_modules():
            if name.endswith("attn2"):
                mod.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, mod, args, kwargs):
        if not self.on:
            return
        x, ctx = args[0], kwargs.get("context", args[1] if len(args) > 1 else None)
        q, k = mod.to_q(x), mod.to_k(ctx)
        b, n, c = q.shape
        h = mod.heads
        q = q.view(b, n, h, c // h).transpose(1, 2)
        k = k.view(b, -1, h, c // h).transpose(1, 2)
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // h), -1).mean(1)
        self.maps.append(p if self.grad else p.detach())


def localisation(base, clip, probe, eval_scenes, conds, x0, sigma, noise) -> dict[str, float]:
    probe.maps, probe.on = [], True
    with torch.no_grad():
        base.apply_model(x0 + noise * sigma, sigma.expand(len(eval_scenes)), c_crossattn=conds)
    probe.on = False
    ratios = {"colour": [], "shape": [], "control": [], "colour@8": [], "shape@8": []}
    for p in probe.maps:
        side = int(round(math.sqrt(p.shape[1])))
        if side not in (8, 16):
            continue
        suffix = "" if side == 16 else "@8"
        for i, scene in enumerate(eval_scenes):
            pos = word_token_index(clip, scene.caption)
            for obj in scene.objects:
                for kind, word in (("colour", obj.colour), ("shape", obj.shape)):
                    a = p[i, :, pos[word]]
                    a = a / a.sum()
                    for name, mask in ((kind + suffix, obj.mask), ("control", obj.mask[::-1, ::-1].copy())):
                        if name == "control" and (kind != "colour" or suffix):
                            continue
                        m = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(mask).float()[None, None], side)
                        m = m.flatten().to(p.device)
                        ratios[name].append(float((a * m).sum()) / float(m.mean()))
    return {k: round(float(np.mean(v)), 2) for k, v in ratios.items()}


def object_token_positions(scene) -> list[tuple[int, int]]:
    """(colour, shape) token positions of each of ``scene.objects``: every scene word is one CLIP token, so word j
    of the caption is token j + 1 (after the start token)."""
    words = scene.caption.split()
    out = []
    for obj in scene.objects:
        j = next(i for i in range(len(words) - 1) if words[i] == obj.colour and words[i + 1] == obj.shape)
        out.append((j + 1, j + 2))
    return out


def grounding_loss(maps, batch, use) -> torch.Tensor:
    """Token-level grounding (as in TokenCompose, Wang et al. 2024): for each object word (colour and shape) of each
    used sample, (1 - the share of the word's cross-attention that falls inside its object)^2, averaged over words
    and attn2 layers. ``maps``: the probe's [B, N, 77] head-averaged maps with gradients."""
    terms = []
    for p in maps:
        side = int(round(math.sqrt(p.shape[1])))
        for i, scene in enumerate(batch):
            if not use[i]:
                continue
            for obj, tokens in zip(scene.objects, object_token_positions(scene)):
                m = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(obj.mask).float()[None, None], side)
                m = m.flatten().to(p.device)
                for tok in tokens:
                    a = p[i, :, tok]
                    terms.append((1 - (a * m).sum() / a.sum().clamp_min(1e-8)) ** 2)
    return torch.stack(terms).mean() if terms else maps[0].sum() * 0


def photo_decoder_state(work: Path) -> Path:
    """work/vae.pt = the photo model's TAESD (hand-set encoder, fine-tuned decoder): tdm.pack puts it in the
    checkpoint."""
    import comfy.utils
    sd = comfy.utils.load_torch_file(str(dm.CHECKPOINT_PATH))
    vae = tdm.hand_set_taesd()
    prefix = "first_stage_model."
    vae.load_state_dict({k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)})
    torch.save(vae.state_dict(), work / "vae.pt")
    return work / "vae.pt"


def repack(path: Path):
    """A step checkpoint with the photo model's TAESD in place of the one it holds (UNet and CLIP unchanged)."""
    import comfy.utils
    vae_path = photo_decoder_state(path.parent)
    sd = comfy.utils.load_torch_file(str(path))
    vae = tdm.hand_set_taesd()
    vae.load_state_dict(torch.load(vae_path))
    sd.update(tdm.to_fp16(tdm.vae_state(vae)))
    tdm.save(sd, path)
    LOG(f"repacked {path} with the photo model's decoder")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ic_scenes"))
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repack", type=Path, help="only rewrite this checkpoint with the photo model's decoder")
    ap.add_argument("--ground-from", type=Path,
                    help="grounding stage: fine-tune this checkpoint (the first stage's step 4000) with the grounding "
                         "loss, two-object scenes from the start; writes ic_demo_scenes_ground_step{k}")
    ap.add_argument("--ground-weight", type=float, default=GROUND_WEIGHT, help="grounding stage: the loss weight")
    ap.add_argument("--ground-lr", type=float, default=GROUND_LR, help="grounding stage: the peak learning rate")
    args = ap.parse_args(argv)
    setup_comfy()
    if args.repack:
        return repack(args.repack)
    torch.use_deterministic_algorithms(True, warn_only=True)
    import comfy.sd
    args.work.mkdir(parents=True, exist_ok=True)
    photo_decoder_state(args.work)
    dm.register_demo_model_config()
    torch.manual_seed(SEED)
    ground = args.ground_from is not None
    start = args.ground_from if ground else tdm.initial_checkpoint(args.work)
    if ground:
        tdm.initial_checkpoint(args.work)       # tdm.pack takes the frozen CLIP from it
        LOG(f"grounding stage from {start} (sha256 {hashlib.sha256(start.read_bytes()).hexdigest()})")
    with torch.no_grad():
        model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(str(start), output_vae=True, output_clip=True)
    base = model.model
    unet = base.diffusion_model
    unet.to(args.device).float().train().requires_grad_(True)
    base.model_sampling.to(args.device)
    vae = tdm.round_fp16_(tdm.hand_set_taesd()).to(args.device)
    probe = CrossAttentionProbe(unet)
    LOG(f"scenes: device {args.device}, torch threads {torch.get_num_threads()}, "
        f"{sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M params")

    eval_rng = np.random.default_rng(SEED + 99)
    evals = {n: [scenes.random_scene(eval_rng, n) for _ in range(12)] for n in (1, 2)}
    sig_tab = base.model_sampling.sigmas.float().to(args.device)
    cond_cache: dict[str, torch.Tensor] = {}

    def cond(caption):
        if caption not in cond_cache:
            with torch.no_grad():
                cond_cache[caption] = clip.encode_from_tokens(clip.tokenize(caption)).float().to(args.device)
        return cond_cache[caption]

    def images(batch):
        return torch.stack([torch.from_numpy(s.image).permute(2, 0, 1) for s in batch]).to(args.device)

    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    peak_lr = args.ground_lr if ground else 1.5e-3
    opt = torch.optim.AdamW(unet.parameters(), lr=peak_lr, weight_decay=0.0)
    rng = np.random.default_rng(SEED + 1)
    gen = torch.Generator().manual_seed(SEED + 2)
    eval_noise = torch.randn((12, 4, 16, 16), generator=torch.Generator().manual_seed(SEED + 3)).to(args.device)

    def evaluate(step):
        saved = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        unet.load_state_dict(ema)
        unet.eval()
        parts = []
        for n, batch in evals.items():
            with torch.no_grad():
                x0 = tdm.encode(vae, images(batch))
            c = torch.cat([cond(s.caption) for s in batch])
            for t in (300, 600):
                r = localisation(base, clip, probe, batch, c, x0, sig_tab[t], eval_noise)
                parts.append(f"{n}obj t={t} {r}")
        unet.load_state_dict(saved)
        unet.train()
        LOG(f"step {step}: word mass in object / area share: " + "; ".join(parts))

    t0 = time.time()
    evaluate(0)
    for step in range(1, args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = peak_lr * min(1.0, step / 100)
        two_share = TWO_OBJECT_SHARE if ground or step > CURRICULUM_STEP else 0.0
        batch = [scenes.random_scene(rng, 2 if rng.random() < two_share else 1) for _ in range(args.batch)]
        drop = rng.random(args.batch) < CAPTION_DROPOUT
        ctx = torch.cat([cond("" if d else s.caption) for s, d in zip(batch, drop)])
        with torch.no_grad():
            x0 = tdm.encode(vae, images(batch))
        t = torch.randint(0, 1000, (args.batch,), generator=gen).to(args.device)
        noise = torch.randn(x0.shape, generator=gen).to(args.device)
        sigma = sig_tab[t]
        # 2024-03's transformer block adds residuals in place; cloning saved tensors keeps backward valid
        probe.maps, probe.on, probe.grad = [], ground, ground
        with torch.autograd.graph.saved_tensors_hooks(lambda z: z.clone(), lambda z: z):
            den = base.apply_model(x0 + noise * sigma[:, None, None, None], sigma, c_crossattn=ctx)
        probe.on, probe.grad = False, False
        # v MSE in x0 terms (as the photo model): |x0 - x0_hat|^2 (sigma^2 + 1) / sigma^2
        loss = (((den - x0) ** 2).mean(dim=(1, 2, 3)) * (sigma ** 2 + 1) / sigma ** 2).mean()
        grounding = torch.zeros(())
        if ground:
            use = [not d and int(ti) < GROUND_MAX_T for d, ti in zip(drop, t.tolist())]
            grounding = grounding_loss(probe.maps, batch, use)
            probe.maps = []
            loss = loss + args.ground_weight * grounding
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(0.995, (1 + step) / (10 + step))
            for k, v in unet.state_dict().items():
                if v.is_floating_point():
                    ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        if step % 50 == 0:
            LOG(f"step {step}/{args.steps} loss {loss.item():.4f} grounding {grounding.item():.4f} "
                f"({(time.time() - t0) / step:.2f} s/step, "
                f"{time.time() - t0:.0f} s wall, {time.process_time():.0f} CPU-s)")
        if step % args.eval_every == 0:
            evaluate(step)
        if step % args.ckpt_every == 0 or step == args.steps:
            torch.save({"step": step, "ema": ema}, args.work / "unet.pt")
            name = "ic_demo_scenes_ground_step" if ground else "ic_demo_scenes_step"
            tdm.pack(args.work, args.work / f"{name}{step}.safetensors")
    LOG(f"scenes: {args.steps} steps in {time.time() - t0:.0f} s wall, {time.process_time():.0f} CPU-s")


if __name__ == "__main__":
    main()
