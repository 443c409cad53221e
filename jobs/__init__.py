"""Thin `ray job submit` entrypoints, one per stage; each parses a config and calls one library function."""
