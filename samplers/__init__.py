"""Step math and sampling loops in ComfyUI's sigma space (no node code here)."""
