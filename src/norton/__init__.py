"""norton."""
