"""Training: the shared loop, the retrain, distillation, momentum, torchrun, augmentation."""
