"""Integrations with web and job frameworks; each module imports its framework."""
