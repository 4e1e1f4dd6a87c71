"""Helpers shared by the command line, training and conversion: atomic output files, overlays, the Hub, model cards."""
