"""MAE pretraining of ViT backbones (DeepSpeed, webdataset shards)."""
