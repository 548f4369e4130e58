"""Command-line front ends: thin argparse wrappers over the Python API."""
