"""Training: the LightningModule, losses, SWA, the run driver, checkpoints, loggers, the GPU pool."""
