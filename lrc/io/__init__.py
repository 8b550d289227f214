"""Files: the checkpoint format, its transformers integration, the report, and atomic output."""
