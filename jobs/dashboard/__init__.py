"""`segments dashboard`: the live view's web page and its Prometheus endpoint (jobs/live_view.py)."""
