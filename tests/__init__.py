"""The test suite: tests/test_<module>.py beside what it covers, shared helpers in
conftest.py, the malformed-scenario table in bad_scenarios.py.

Owns the checks that every claim of the README holds (virtual clock, deterministic). May
import anything in the repository (`testbed`, `runners`, `tools`); nothing imports the
tests. test_imports.py enforces the import rules the packages state.
"""
