"""Backbones (ViT tiny→huge, ResNet-18/50) and SSL heads. Knows nothing about methods."""
