"""Batch and pacing: a prompt over many rows (`run`, its result in `result`, its worker loop in
`rows`, its budget in `budget`), at the endpoint's own pace (`pace`), never paid twice (`ledger`:
checkpoints and the cache), and on Spark's executors (`spark`)."""
