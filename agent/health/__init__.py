"""Health checks: HAProxy-style TCP/HTTP probes against each VM, the Rancher health state
machine, and reports to the controller (`POST /serviceevents`).

Kept free of imports here: the spec models import `request_line` from this package.
"""
