"""Generated from proto/idemd by clients/python/scripts/generate; do not edit."""
