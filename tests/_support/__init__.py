"""The tests' fixtures package: tiny models, teachers, server processes and waits, shared by
every test package.

Imported as `tests._support.<module>`: pytest puts the repository root on `sys.path`
(`pythonpath = ["."]` in pyproject.toml), and every subprocess a test starts gets the same
root on PYTHONPATH (`teachers.ENV`), so test-only specs such as
`tests._support.models:slow_cnn` resolve there too. No test relies on pytest inserting its
own directory into `sys.path`.
"""
