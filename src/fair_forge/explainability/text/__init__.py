"""Text in: prompts and chat templates, segmentation into features, the items a batch takes."""
