"""Floor 2: the video DiT over typed token groups, latent<->token adapters, DiT registry."""
