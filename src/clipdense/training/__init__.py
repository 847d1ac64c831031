"""Training: the segmentation/detection ``engine``, ShapesCLIP ``clip_pretrain`` and their ``loop`` toolkit."""
