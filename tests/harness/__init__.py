"""Test harness shared by tests/ and bench/: a real ComfyUI in-process and as a headless server, small
random-weight models built from ComfyUI's own classes, real photos."""
