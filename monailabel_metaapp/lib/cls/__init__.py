"""Few-shot classification in the app: heads, class corrections, region views, the service, routes."""
