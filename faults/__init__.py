"""The fault harness: the platform under load with seeded faults, and a checker."""
