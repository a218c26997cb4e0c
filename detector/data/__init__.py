"""Data: the MVTec AD reader, the synthetic carpet set, augmentation and simulated line shifts."""
