"""Hand-written PyTorch reference models for families that timm does not have."""
