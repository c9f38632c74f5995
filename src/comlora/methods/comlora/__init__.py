"""comlora."""
