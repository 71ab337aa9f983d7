"""Integrations with the frameworks and tools applications run the router in.

Each module imports its framework only when imported itself: importing
``sqlalchemy_replicas`` never imports any of them.
"""
