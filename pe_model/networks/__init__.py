"""Neural networks of the two stages."""
