"""Per-image optimisation on a ComfyUI model: null-text inversion, StyleDiffusion's mappers, and the autograd
plumbing they share (training.py). Step math comes from samplers/ddim.py; the model is called through compat."""
