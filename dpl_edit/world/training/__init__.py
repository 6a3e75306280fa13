"""Training the bundled world model, split by purpose: data, VAE, UNet, export, and the run."""
