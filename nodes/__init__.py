"""Thin V1 node classes: validate, call library code, return."""
from . import contract, invert, inverted_noise, kv_inject, rival, attention_maps, p2plus, style_diffusion

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in (invert, inverted_noise, kv_inject, rival, attention_maps, p2plus, style_diffusion):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
contract.register(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)
