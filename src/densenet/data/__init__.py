"""Data: image files, data sets, augmentation."""
