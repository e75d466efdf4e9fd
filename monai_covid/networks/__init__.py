"""Networks of the five seed papers, one file each."""
