"""Admission control: a job starts only if its account can cover the most it may cost."""
