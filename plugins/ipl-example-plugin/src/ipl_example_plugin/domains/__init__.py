"""Domain files of the example pack (the *.toml files beside this module)."""
