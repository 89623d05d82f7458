"""Networks: the StyleGAN2 generator, CLIP wrappers, latent mappers and their layers."""
