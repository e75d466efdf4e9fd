"""Infer tasks of the monai-covid MONAI Label app (see ``docs/monailabel.md``)."""
