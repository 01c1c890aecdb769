"""Network-namespace testbed and the scenarios run in it (demo)."""
