"""The reporter worker: see the README's status table (it lands with its issue)."""
