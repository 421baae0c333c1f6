"""Everything that touches disk: data sets, run files (HDF5) and checkpoints."""
