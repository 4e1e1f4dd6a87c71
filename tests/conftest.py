import os


# Nothing in the test suite may reach the Hub: every lookup would otherwise retry for ~20 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
