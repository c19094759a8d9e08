"""Neural networks: CLIP wrapper, priors, decoder and upsampler UNets (no diffusion maths here)."""
