"""Everything that touches files: checkpoints, downloads, HDF5 stores, atomic writes."""
