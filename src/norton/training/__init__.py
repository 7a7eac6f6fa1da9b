"""Fine-tuning and training: datasets and loaders, the training loop, checkpoints and recipes."""
