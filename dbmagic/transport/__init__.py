"""Transport and credentials: where the workspace is and how a request proves who sends it
(`credentials`, `secret`, the Databricks Apps login rules in `apps`), and the one HTTP path:
timeouts, the retry policy and its state, the clock seam (`http`, `retry`) over a handler
(`requests_handler`, or dbmagic.testing's in-memory one)."""

MAX_TIMEOUT = 3600.0  # seconds: the longest timeout dbmagic takes (--timeout, Timeouts)
