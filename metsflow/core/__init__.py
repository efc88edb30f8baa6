"""Core: file I/O and atomic writes, label conventions, the results layout, settings, the config schema, runtime knobs. Imports nothing else of metsflow."""
