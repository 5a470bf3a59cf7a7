"""Operator safety: plan diff, lockout guard, commit-confirmed apply, explain and selftest."""
