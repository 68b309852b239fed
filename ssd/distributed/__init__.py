"""The only Ray code of the library: Ray Train glue around ``ssd.training`` (and, later, Tune)."""
