"""Training scripts (e.g. contrastive pre-training of ShapesCLIP on ShapesWorld: ``clip_pretrain``)."""
