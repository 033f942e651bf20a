"""Growing a pretrained model into a larger one (LiGO, stacking)."""
