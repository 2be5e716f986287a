"""The pure tier: tests of code that runs without ComfyUI (step math, token alignment, the import graph, the shipped
workflow files). The pack is registered without its __init__ (tests/harness/pure.py), so importing its pure modules
boots nothing; tests/unit/test_purity.py checks that ComfyUI stays out of the process."""
from tests.harness import pure

pure.register_pack()
