"""``saga bench``: the coordinator measured against floors, each side a process of its own."""
