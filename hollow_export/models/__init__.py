"""Where the Stable Diffusion pipeline comes from: registry (configs), load (diffusers objects), prompts."""
