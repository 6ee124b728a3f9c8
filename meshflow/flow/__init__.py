"""Flow control: how many runs start, when, and how many of their steps execute at once.

Each control is a pure decision over its stored state (``decide(state, now) -> Decision``), kept
in the ``{ns}_flow`` bucket and updated by compare-and-set, so limits hold across any number of
workers and survive their restarts. ``docs/flow-control.md`` has the table of what each control
delays, drops or cancels.
"""
