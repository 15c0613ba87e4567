"""The pure core: saga rules as data and functions, with no I/O and no clock reads."""
