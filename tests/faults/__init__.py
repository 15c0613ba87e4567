"""Fault tests: storage that fails (locked, full, I/O errors, corrupt files) and bad input."""
