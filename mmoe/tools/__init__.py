"""Tools on top of the core and the engine: `bench` (``mmoe bench``) and `compare` (``mmoe compare``)."""
