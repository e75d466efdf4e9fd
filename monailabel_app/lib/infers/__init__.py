"""MONAI Label infer tasks over the monai-covid bundles."""
