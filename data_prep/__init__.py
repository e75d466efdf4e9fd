"""Data preparation: DICOM/NIfTI I/O, HU window, lung mask, tone map, enhancement, datalists."""
