"""Data input/output: the shared manifest schema and audio loading."""
