"""LoRA training for SD3.5 and BLIP: the two trainers (``python -m pipelines.training.train_sd3_lora``
and ``train_blip_lora``), their settings, data and output files, and runs in the background."""
