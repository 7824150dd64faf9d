"""rareret: scaling sweeps that study rare-task retention (JAX/Flax)."""
