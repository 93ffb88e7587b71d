"""Ground floor: file I/O, JSON values, seeding, data sets and image grids.  Imports nothing else of diffsolve."""
