"""Attention maps: capture during sampling, query by word/point, render as images (edits nothing)."""
