"""The two models in one loop (prompt -> SD3.5 image -> BLIP caption -> BLIP scores) and the
prompt-adherence evaluation built on it (``python -m pipelines.roundtrip.evaluate``)."""
