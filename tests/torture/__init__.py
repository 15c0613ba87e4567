"""The torture harness: crash, fault and kill a real coordinator and real participants, then
check offline that every guarantee held."""
