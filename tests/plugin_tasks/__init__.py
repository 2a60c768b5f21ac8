"""Tasks written from their equations alone, as a user would (docs/extending.md)."""
