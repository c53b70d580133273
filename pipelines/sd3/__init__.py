"""Stable Diffusion 3.5: text-to-image, loading in a memory mode, PNG metadata, and the generation
service every tab draws through."""
