"""The application facade: what route handlers and the CLI's server side talk to.

``platform.Platform`` deploys, lists, deletes and calls functions; the workflow
registry keeps workflow definitions and calls stages through the platform.
"""
