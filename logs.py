"""The pack's one logger: every module logs through ``log`` (ComfyUI's console shows it), no prints."""
import logging

log = logging.getLogger("inversion_chain")
