"""Floor 2: video decoding/encoding, the synthetic video generator, sources, latent shards."""
