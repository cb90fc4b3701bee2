"""Every picture gradtrace draws: image grids (`grids`), learned weights (`weights`), per-group LDS (`lds`),
and the attribution report of a run (`attributions`). Modules are imported where used (matplotlib loads
only then)."""
