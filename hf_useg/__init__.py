"""hf_useg (package init is being assembled; the full one is __init__.py.pending)."""
