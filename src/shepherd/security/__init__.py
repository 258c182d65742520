"""Who may call what: principals and their roles, JWT verification, access control, audit and start-up posture.

See docs/security.md for the threat model and the route classes.
"""
