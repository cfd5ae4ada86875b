"""CapFilt (BLIP): caption noisy web images and filter web and synthetic captions on Ray."""
