"""Fault injection and hostile input: each test injects one fault (or feeds one broken input)
and checks that nothing is lost and nothing escapes. Every test registers its row of
docs/reliability.md (see registry.py); `python -m tests.faults.report` regenerates that table.
"""
