"""The meshflow web dashboard (Starlette). Arrives with its own issue; this package reserves the name."""
