"""The ground floor: errors, the environment, atomic files, registries, the run folder's layout and messages."""
