"""Commands built on runs: plan, sweep, reproduce, constitutional AI."""
