"""Local HTTP sandboxes for the ad platforms, validating requests the way the platforms do.

``python -m tests.sandboxes meta google tiktok`` serves them for demos (see ``__main__``).
"""
