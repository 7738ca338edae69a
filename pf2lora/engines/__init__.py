"""Engines run methods: `local` is the in-process runner (the default)."""
