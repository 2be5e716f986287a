"""Shared bits of the node classes: category names, input helpers."""
CATEGORY = "Inversion Chain"


def tip(kind, tooltip, **options):
    """A V1 input spec with a tooltip (ComfyUI shows it on hover)."""
    return (kind, dict(options, tooltip=tooltip))
