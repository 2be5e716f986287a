"""Attention editors: P2Plus, KV Inject, RIVAL, StyleDiffusion and decoder feature injection."""
