"""The basics every layer uses: argument checks, seeds, atomic writes, the cache folder. Imports nothing of tinylab."""
