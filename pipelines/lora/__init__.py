"""SD3.5 LoRAs: the file formats and their conversion, where a LoRA comes from, and the library that
loads, mixes, fuses and unloads them."""
