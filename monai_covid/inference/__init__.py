"""Reusable inference logic shared by the bundles' ``inference.json`` and the ``monai-covid`` command line."""
