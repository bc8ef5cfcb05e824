"""Compression: data loading, candidate evaluation, the recipe search and the report."""
