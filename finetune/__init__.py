"""Top-down heatmap pose fine-tuning and OKS evaluation (DeepSpeed, pycocotools)."""
