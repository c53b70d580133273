"""BLIP: captioning with every decoding strategy, image-text matching, cross-attention heatmaps,
batch and folder captioning, and LoRA adapters on the text decoder."""
