"""Segmentation in the app: the service, its versioned heads, background refinement, click corrections, routes."""
