"""The lowest layer: small readers every other package may use. Knows no model, no media, no training."""
