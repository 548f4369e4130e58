"""Training: one module per stage (`vae`, `unet`) and what they share (`checkpoint`, `common`)."""
